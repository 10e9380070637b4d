"""lowtune export vllm: an adapter folder that meets vLLM's LoRA loader's rules, loads as the same adapter, carries
the run's chat template, and comes with the command that serves it."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lowtune.data.read import Message
from lowtune.errors import UserError
from lowtune.export.merge import chat_template
from lowtune.export.vllm import export_vllm, vllm_problems
from tests.export.conftest import GREEDY, PROMPTS

SEVEN = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_the_exported_adapter_loads_as_the_run_s_and_serves_with_its_chat_template(tiny_run, adapter_model, tmp_path):
    command = export_vllm(tiny_run, tmp_path / "vllm", name="huanhuan")
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["target_modules"] == SEVEN and vllm_problems(config) == []
    assert (
        load_file(tmp_path / "vllm" / "adapter_model.safetensors").keys()
        == load_file(tiny_run / "adapter_model.safetensors").keys()
    )
    assert (tmp_path / "vllm" / "chat_template.jinja").read_text() == chat_template(adapter_model.chat_format)
    words = shlex.split(command)
    assert words[:3] == ["vllm", "serve", config["base_model_name_or_path"]]
    assert "--enable-lora" in words and words[words.index("--lora-modules") + 1] == f"huanhuan={tmp_path / 'vllm'}"
    assert words[words.index("--chat-template") + 1] == str(tmp_path / "vllm" / "chat_template.jinja")
    assert "--max-lora-rank" not in words  # rank 8: within vLLM's default of 16
    # The folder, read by peft as vLLM reads it (short target names), is the same adapter.
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    served = PeftModel.from_pretrained(base, tmp_path / "vllm").eval()
    chat_format = adapter_model.chat_format
    for prompt in PROMPTS:
        ids = chat_format.encode_prompt([Message("user", prompt)])
        prompt_ids = torch.tensor([ids])
        output = served.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            do_sample=False,
            max_new_tokens=20,
            eos_token_id=chat_format.stop_token_ids,
        )
        assert output[0, len(ids) :].tolist() == adapter_model.generate_ids(ids, GREEDY), prompt


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "without biases"),
        ({"target_modules": ["q_proj", "lm_head"]}, "not on lm_head"),
        ({"r": 1024}, "largest --max-lora-rank"),
    ],
)
def test_what_vllm_would_refuse_is_refused_before_anything_is_written(change, refused, tiny_run, tmp_path):
    config = json.loads((tiny_run / "adapter_config.json").read_text()) | change
    assert any(refused in problem.message for problem in vllm_problems(config))
    run = tmp_path / "run"
    run.mkdir()
    for file in tiny_run.iterdir():
        if file.is_file():
            (run / file.name).write_bytes(file.read_bytes())
    (run / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=refused):
        export_vllm(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_rank_above_vllm_s_default_gets_the_smallest_max_lora_rank_that_holds_it(tiny_run, tmp_path):
    from lowtune.export.vllm import serve_command

    words = shlex.split(serve_command(tiny_run, tmp_path, "a", rank=40))
    assert words[words.index("--max-lora-rank") + 1] == "64"


def test_a_folder_that_is_not_a_run_is_refused_with_the_reason(tmp_path):
    with pytest.raises(UserError, match="adapter folder not found"):
        export_vllm(tmp_path / "nowhere", tmp_path / "out")
