"""lowtune merge: base + adapter as one plain folder that transformers loads and that answers as base + adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowtune.data.read import Message
from lowtune.data.templates import FORMATS
from lowtune.errors import UserError
from lowtune.export.merge import chat_template, merge_adapter
from lowtune.infer.session import ChatModel
from tests.conftest import MEMORISE, tiny_config, write_jsonl
from tests.export.conftest import GREEDY, PROMPTS


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory) -> Path:
    """The tiny run merged in fp32, in small shards, over a folder that an older merge left."""
    out = tmp_path_factory.mktemp("merged")
    (out / "stale.txt").write_text("left by an older merge")
    return merge_adapter(tiny_run, out, dtype="fp32", overwrite=True, max_shard_size="50MB")


def test_plain_transformers_gives_the_greedy_answers_of_base_plus_adapter(merged, adapter_model):
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert model.dtype == torch.float32 and not hasattr(model, "peft_config")
    answers = {record["instruction"]: record["output"] for record in MEMORISE}
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = ids["input_ids"]
        assert ids == adapter_model.chat_format.encode_prompt([Message("user", prompt)])
        prompt_tensor = torch.tensor([ids])
        # No eos_token_id given: the merged folder's generation config must stop at the end of the turn.
        output = model.generate(
            prompt_tensor, attention_mask=torch.ones_like(prompt_tensor), do_sample=False, max_new_tokens=20
        )
        new_ids = output[0, len(ids) :].tolist()
        assert new_ids == adapter_model.generate_ids(ids, GREEDY), prompt
        if prompt in answers:
            assert tokenizer.decode(new_ids, skip_special_tokens=True) == answers[prompt]


def test_merged_folder_holds_shards_tokenizer_format_and_stop_ids(merged, tiny_run, adapter_model):
    assert not (merged / "stale.txt").exists()
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config_mode = (merged / "config.json").stat().st_mode
    assert {(merged / shard).stat().st_mode for shard in index["weight_map"].values()} == {config_mode}
    assert not any("lora" in name for name in index["weight_map"])
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    generation = json.loads((merged / "generation_config.json").read_text())
    tokenizer = adapter_model.tokenizer
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    saved = json.loads((tiny_run / "chat_format.json").read_text())
    assert json.loads((merged / "chat_format.json").read_text()) == saved


def test_chat_model_from_the_merged_folder_uses_the_trained_format(merged, tiny_run):
    chat_model = ChatModel.from_model_dir(merged)
    assert chat_model.model.dtype == torch.float32  # the dtype the folder was saved in
    assert chat_model.chat_format.to_dict() == json.loads((tiny_run / "chat_format.json").read_text())
    for record in MEMORISE:
        assert chat_model.reply([Message("user", record["instruction"])], GREEDY) == record["output"]


@pytest.mark.parametrize("name", ["qwen", "seed", "tokenizer"])
@pytest.mark.parametrize("system", [None, 'Say "{{ hi }}" %} 甄嬛\n\\'])
def test_chat_template_renders_the_prompt_of_the_format(qwen_tokenizer, name, system):
    chat_format = FORMATS[name](qwen_tokenizer, system)
    template = chat_template(chat_format)
    conversations = [
        [Message("user", "你是谁？")],
        [Message("system", "S"), Message("user", "hi")],
        [Message("user", "a b"), Message("assistant", " c\n"), Message("user", "d")],
    ]
    for messages in conversations:
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        text = qwen_tokenizer.apply_chat_template(
            dicts, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        ids = chat_format.encode_prompt(messages)
        assert text == qwen_tokenizer.decode(ids)
        assert qwen_tokenizer(text, add_special_tokens=False)["input_ids"] == ids


def test_refuses_a_non_empty_out_dir_and_a_bad_dtype_at_once(tiny_run, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError) as raised:
        merge_adapter(tiny_run, tmp_path, dtype="int8")
    assert len(raised.value.problems) == 2
    assert "not empty" in str(raised.value) and "--overwrite" in str(raised.value)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_overwrite_never_deletes_the_adapter(tiny_run):
    with pytest.raises(UserError, match="would delete"):
        merge_adapter(tiny_run, tiny_run.parent, overwrite=True)
    assert (tiny_run / "adapter_model.safetensors").is_file()


def test_adapter_trained_in_4bit_merges_into_full_precision(tmp_path, tiny_qwen2, caplog):
    from lowtune.recipe import run

    config = tiny_config(tiny_qwen2, write_jsonl(tmp_path / "data.jsonl", MEMORISE), tmp_path / "run", max_steps=2)
    config.model.quantization = "4bit"
    adapter_dir = run(config)
    with caplog.at_level(logging.INFO, logger="lowtune"):
        out = merge_adapter(adapter_dir, tmp_path / "merged", dtype="fp32")
    assert "trained on a 4bit base" in caplog.text and "full-precision" in caplog.text
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
