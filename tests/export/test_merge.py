"""lowtune merge: base + adapter as one plain folder that transformers loads and that answers as base + adapter."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lowtune.config import load_run_config, save_config
from lowtune.data.read import Message
from lowtune.data.templates import FORMATS
from lowtune.errors import UserError
from lowtune.export.gguf import export_gguf
from lowtune.export.merge import chat_template, merge_adapter
from lowtune.export.merge_check import DEFAULT_LIMITS, REPORT_FILE_NAME, MergeCheck, check_prompts
from lowtune.infer.session import ChatModel
from tests.conftest import MEMORISE, tiny_config, write_jsonl
from tests.export.conftest import GREEDY, PROMPTS
from tests.test_bad_input import run_cli


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


@pytest.fixture(scope="module")
def tiny_4bit_run(tmp_path_factory, tiny_qwen2) -> Path:
    """The tiny run's training on a 4-bit base: the adapter learned against the NF4-rounded weights."""
    from lowtune.recipe import run

    folder = tmp_path_factory.mktemp("tiny-4bit-run")
    config = tiny_config(tiny_qwen2, write_jsonl(folder / "data.jsonl", MEMORISE), folder / "run", max_steps=30)
    config.train.learning_rate = 1e-2
    config.model.quantization = "4bit"
    return run(config)


def report_of(folder: Path) -> dict:
    return json.loads((folder / REPORT_FILE_NAME).read_text())


def test_a_4bit_run_merged_into_its_dequantized_weights_answers_as_base_plus_adapter(tiny_4bit_run, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lowtune"):
        out = merge_adapter(tiny_4bit_run, tmp_path / "merged", dtype="fp32")  # --into dequantized: the default
    assert "merged into those quantized weights, dequantized" in caplog.text
    assert "greedy agreement 100.00%" in caplog.text
    report = report_of(out)
    assert report["into"] == "dequantized" and report["reference"] == "4bit base + adapter, as trained"
    assert report["greedy_agreement"] == 1.0 and report["mean_kl"] < 1e-5 and report["max_kl"] < 1e-4
    assert report["passed"] and not report["forced"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    trained = ChatModel.from_adapter(tiny_4bit_run)  # the 4-bit base + adapter
    for prompt in PROMPTS:
        ids = trained.chat_format.encode_prompt([Message("user", prompt)])
        output = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20)
        assert output[0, len(ids) :].tolist() == trained.generate_ids(ids, GREEDY), prompt


def test_into_original_stops_with_its_measured_difference_and_force_writes_it(
    tiny_4bit_run, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "merged"
    code, err = run_cli(
        monkeypatch,
        capsys,
        "merge",
        "--adapter",
        str(tiny_4bit_run),
        "--out",
        str(out),
        "--dtype",
        "fp32",
        "--into",
        "original",
    )
    assert code == 2 and "Traceback" not in err
    assert "does not answer as 4bit base + adapter" in err and "mean KL" in err and "nothing was written" in err
    assert "--into dequantized" in err and "--force" in err
    assert not out.exists() and not list(tmp_path.iterdir())  # no staging folder either
    merge_adapter(tiny_4bit_run, out, dtype="fp32", into="original", check=MergeCheck(force=True))
    report = report_of(out)
    assert report["into"] == "original" and not report["passed"] and report["forced"]
    # The full-precision weights lack the NF4 rounding the adapter learned against: a difference, measured.
    assert report["mean_kl"] > DEFAULT_LIMITS.max_kl or report["greedy_agreement"] < DEFAULT_LIMITS.min_agreement


def test_a_merge_with_a_wrong_scale_is_caught_and_writes_nothing(tiny_run, tmp_path, monkeypatch):
    """A merge that adds the LoRA update twice (the reference, which never merges, computes it once)."""
    from peft.tuners.lora.layer import Linear

    delta = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: 2 * delta(self, adapter))
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="does not answer as base \\+ adapter") as raised:
        merge_adapter(tiny_run, out, dtype="fp32")
    assert "--force" in str(raised.value) and "--into" not in str(raised.value)  # no --into for an unquantized base
    assert not out.exists() and not list(tmp_path.iterdir())
    merge_adapter(tiny_run, out, dtype="fp32", check=MergeCheck(force=True))
    report = report_of(out)
    assert not report["passed"] and report["forced"] and report["greedy_agreement"] < 0.9


def test_the_report_names_what_was_compared_on_which_prompts(merged, tmp_path):
    report = report_of(merged)
    assert report["adapter"].endswith("run") and report["into"] == "original" and report["dtype"] == "float32"
    assert report["reference"] == "base + adapter, as trained"
    assert report["prompts"] == len(MEMORISE) and "last records of data.files" in report["prompts_source"]
    assert report["positions"] >= report["prompts"] and report["max_new_tokens"] == 32
    assert report["greedy_agreement"] == 1.0 and report["mean_kl"] < 1e-6
    limits = {"max_mean_kl": DEFAULT_LIMITS.max_kl, "min_greedy_agreement": DEFAULT_LIMITS.min_agreement}
    assert report["limits"] == limits and report["passed"] and not report["forced"]


def test_prompts_from_a_file_and_held_out_records(tiny_run, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ["你好", {"prompt": "Who are you?", "system": "Be brief."}])
    conversations, source = check_prompts(tiny_run, MergeCheck(prompts_file=prompts))
    assert source == str(prompts)
    brief = [Message("system", "Be brief."), Message("user", "Who are you?")]
    assert conversations == [[Message("user", "你好")], brief]
    config = load_run_config(tiny_run)
    config.data.val_size = 2
    (tmp_path / "run").mkdir()
    save_config(config, tmp_path / "run")
    conversations, source = check_prompts(tmp_path / "run", MergeCheck())
    assert "held out" in source and len(conversations) == 2


def test_into_is_an_error_for_a_run_trained_unquantized_and_for_a_model_folder(tiny_run, merged, tmp_path):
    with pytest.raises(UserError, match="--into applies only to an adapter trained on a quantized") as raised:
        merge_adapter(tiny_run, tmp_path / "merged", into="dequantized")
    assert "leave out --into" in str(raised.value) and not (tmp_path / "merged").exists()
    with pytest.raises(UserError, match="--into applies only"):
        export_gguf(tmp_path / "run.gguf", adapter=tiny_run, into="original")
    with pytest.raises(UserError, match="--into applies only to --adapter"):
        export_gguf(tmp_path / "model.gguf", model=merged, into="original")
    with pytest.raises(UserError, match="unknown --into 'fp8'"):
        merge_adapter(tiny_run, tmp_path / "merged", into="fp8")


def test_the_command_s_limits_are_the_library_s():
    from lowtune.cli import merge

    parameters = inspect.signature(merge).parameters
    assert parameters["max_kl"].default == DEFAULT_LIMITS.max_kl
    assert parameters["min_agreement"].default == DEFAULT_LIMITS.min_agreement
