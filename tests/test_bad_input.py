"""Every kind of user mistake: exit code 2, one message with the file, the line and the fix, nothing written.

Each case goes through the real CLI (`lowtune.cli.main`), before any weight is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import MEMORISE, write_jsonl

GOOD = '{"instruction": "q", "input": "", "output": "a"}\n'
DATA_CASES = {
    "malformed JSONL": ('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": \n', 2, "not valid JSON"),
    "missing field": ('{"instruction": "q"}\n', 1, "missing field 'output'"),
    "mistyped field": (GOOD + '{"instruction": "q", "outptu": "a"}\n', 2, "did you mean 'output'"),
    "wrong type": ('{"instruction": ["q"], "output": "a"}\n', 1, "must be a string"),
    "empty file": ("\n", None, "data file is empty"),
    "empty reply": (GOOD + '{"instruction": "q", "output": ""}\n', 2, "empty 'output'"),
    "unknown role": ('{"messages": [{"role": "bot", "content": "x"}]}\n', 1, "unknown role 'bot'"),
}


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from lowtune.cli import main

    monkeypatch.setattr(sys, "argv", ["lowtune", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err.replace("\n", " ")


def train_cli(monkeypatch, capsys, tmp_path: Path, model: Path, data: Path, *extra: str) -> tuple[int, str]:
    """`lowtune train --model MODEL --data DATA --output-dir TMP/run EXTRA...`."""
    arguments = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "run")]
    return run_cli(monkeypatch, capsys, *arguments, *extra)


def assert_clean_refusal(code: int, err: str, output: Path, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err and "fix:" in err
    for needle in needles:
        assert needle in err, needle
    assert not output.exists()


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data(case, tmp_path, tiny_qwen2, monkeypatch, capsys):
    content, line, needle = DATA_CASES[case]
    data = tmp_path / "data.jsonl"
    data.write_text(content, encoding="utf-8")
    code, err = train_cli(monkeypatch, capsys, tmp_path, tiny_qwen2, data)
    where = f"{data}:{line}" if line else str(data)
    assert_clean_refusal(code, err, tmp_path / "run", where, needle)


def test_non_utf8_data(tmp_path, tiny_qwen2, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(GOOD.encode() + b'{"instruction": "\xff", "output": "a"}\n')
    code, err = train_cli(monkeypatch, capsys, tmp_path, tiny_qwen2, data)
    assert_clean_refusal(code, err, tmp_path / "run", f"{data}:2", "not UTF-8")


def test_records_longer_than_max_length(tmp_path, tiny_qwen2, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", MEMORISE + [{"instruction": "长" * 200, "input": "", "output": "a"}])
    code, err = train_cli(
        monkeypatch, capsys, tmp_path, tiny_qwen2, data, "--set", "data.max_length=64", "--set", "data.truncation=error"
    )
    assert_clean_refusal(code, err, tmp_path / "run", f"{data}:5", "longer than data.max_length=64")


def test_unknown_config_key(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\ntrain:\n  learning_rat: 1e-4\n")
    code, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert_clean_refusal(code, err, tmp_path / "run", f"{config}:3", "unknown key 'train.learning_rat'")


def test_missing_model_folder(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", MEMORISE)
    code, err = train_cli(monkeypatch, capsys, tmp_path, tmp_path / "nowhere", data)
    assert_clean_refusal(code, err, tmp_path / "run", str(tmp_path / "nowhere"), "model folder not found")


def test_a_quantization_this_machine_cannot_do(tmp_path, tiny_qwen2, monkeypatch, capsys):
    from dataclasses import replace

    from lowtune import machine

    monkeypatch.setattr(machine, "_DETECTED", replace(machine.this_machine(), packages=frozenset()))  # no bitsandbytes
    data = write_jsonl(tmp_path / "data.jsonl", MEMORISE)
    code, err = train_cli(monkeypatch, capsys, tmp_path, tiny_qwen2, data, "--set", "model.quantization=4bit")
    assert_clean_refusal(code, err, tmp_path / "run", "needs bitsandbytes")


def test_an_existing_run_is_never_overwritten(tmp_path, tiny_qwen2, monkeypatch, capsys):
    output = tmp_path / "run"
    output.mkdir()
    (output / "adapter_model.safetensors").write_bytes(b"precious")
    data = write_jsonl(tmp_path / "data.jsonl", MEMORISE)
    code, err = run_cli(
        monkeypatch, capsys, "train", "--model", str(tiny_qwen2), "--data", str(data), "--output-dir", str(output)
    )
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (output / "adapter_model.safetensors").read_bytes() == b"precious"


def test_remote_code_is_off_unless_asked(tmp_path):
    from lowtune.config import ModelSettings, load_config

    assert load_config(None).model.trust_remote_code is False
    assert "run Python code shipped in the model folder" in ModelSettings.model_fields["trust_remote_code"].description


def test_unknown_lora_target(tmp_path, tiny_qwen2, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", MEMORISE)
    code, err = train_cli(
        monkeypatch, capsys, tmp_path, tiny_qwen2, data, "--set", "lora.target_modules=[q_proj, nope]"
    )
    assert code == 2 and "no linear layer named nope" in err and "q_proj" in err and "fix:" in err


def test_a_gguf_type_the_gguf_package_cannot_write(tmp_path, tiny_qwen2, monkeypatch, capsys):
    out = tmp_path / "model.gguf"
    code, err = run_cli(
        monkeypatch, capsys, "export", "gguf", "--model", str(tiny_qwen2), "--out", str(out), "--type", "q4_k_m"
    )
    assert_clean_refusal(code, err, out, "cannot write K-quants", "llama-quantize")


def write_parquet(path: Path, records: list[dict]) -> None:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)


def write_text(content: str):
    return lambda path: path.write_text(content, encoding="utf-8")


SHAREGPT_TURNS = '[{"from": "human", "value": "q"}, {"from": "%s", "value": "a"}]'
MAPPED = "data.files=[{path: %s, columns: {instruction: quest, output: answer}}]"
# name: (file name, writer, line or row, what the message says, more overrides)
NEW_KIND_CASES = {
    "bad CSV quoting": ("d.csv", write_text('instruction,output\nq,a\n"q"x,a\n'), 3, "not valid CSV", ()),
    "CSV row of other width": ("d.csv", write_text("instruction,output\nq,a,b\n"), 2, "3 cells in this row", ()),
    "TSV quoting": ("d.tsv", write_text('instruction\toutput\n"q\ta\n'), 2, "not valid TSV", ()),
    "not Parquet": ("d.parquet", write_text('{"instruction": "q"}'), None, "not a Parquet file", ()),
    "missing mapped column": (
        "d.parquet",
        lambda path: write_parquet(path, [{"question": "q", "answer": "a"}]),
        None,
        "no column 'quest' (mapped to instruction) in the file; its columns: question, answer",
        (MAPPED,),
    ),
    "non-string cell": (
        "d.parquet",
        lambda path: write_parquet(path, [{"instruction": "q", "output": 7}]),
        1,
        "field 'output' must be a string, found int",
        (),
    ),
    "unknown ShareGPT role": (
        "d.json",
        write_text('[{"conversations": %s}]' % (SHAREGPT_TURNS % "robot")),
        1,
        "unknown role 'robot'",
        (),
    ),
    "tool turn": ("d.jsonl", write_text('{"conversations": %s}\n' % (SHAREGPT_TURNS % "observation")), 1,
                  "'observation' turns (tool use) are not supported", ()),
    "empty conversation": ("d.jsonl", write_text('{"conversations": []}\n'), 1, "must be a non-empty list", ()),
}  # fmt: skip


@pytest.mark.parametrize("case", list(NEW_KIND_CASES))
def test_bad_input_of_the_new_kinds(case, tmp_path, tiny_qwen2, monkeypatch, capsys):
    name, write, line, needle, settings = NEW_KIND_CASES[case]
    data = tmp_path / name
    write(data)
    extra = [argument for setting in settings for argument in ("--set", setting.replace("%s", str(data)))]
    code, err = train_cli(monkeypatch, capsys, tmp_path, tiny_qwen2, data, *extra)
    assert_clean_refusal(code, err, tmp_path / "run", f"{data}:{line}" if line else str(data), needle)


def test_a_held_out_count_as_large_as_the_data(tmp_path, tiny_qwen2, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(GOOD, encoding="utf-8")
    code, err = train_cli(monkeypatch, capsys, tmp_path, tiny_qwen2, data, "--set", "data.val_size=3")
    assert_clean_refusal(code, err, tmp_path / "run", "data.val_size=3 holds out 3 records, and the data has 1")


MIX = "data.files=[{path: %s, %s}]"
# name: (how the file is drawn, what the message says); the file holds one record
MIX_CASES = {
    "weight and samples both": ("weight: 0.5, samples: 1", "weight 0.5 and samples 1 both given"),
    "weight of 0": ("weight: 0", "weight: Input should be greater than 0"),
    "weight above 1": ("weight: 2", "weight: Input should be less than or equal to 1"),
    "more samples than records": ("samples: 5", "samples: 5 asks for more records than the file has (1)"),
}


@pytest.mark.parametrize("case", list(MIX_CASES))
def test_bad_mixtures(case, tmp_path, tiny_qwen2, monkeypatch, capsys):
    drawn, needle = MIX_CASES[case]
    data = tmp_path / "d.jsonl"
    data.write_text(GOOD, encoding="utf-8")
    code, err = train_cli(monkeypatch, capsys, tmp_path, tiny_qwen2, data, "--set", MIX % (data, drawn))
    assert_clean_refusal(code, err, tmp_path / "run", needle)


def test_samples_of_a_file_that_is_not_there(tmp_path, tiny_qwen2, monkeypatch, capsys):
    data, missing = tmp_path / "d.jsonl", tmp_path / "missing.jsonl"
    data.write_text(GOOD, encoding="utf-8")
    code, err = train_cli(monkeypatch, capsys, tmp_path, tiny_qwen2, data, "--set", MIX % (missing, "samples: 1"))
    assert_clean_refusal(code, err, tmp_path / "run", str(missing), "data file not found")


def test_a_bad_line_past_the_first_chunks_of_a_streamed_file(tmp_path, tiny_qwen2, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(GOOD.replace("\n", "\r").encode() * 30_000 + b'{"instruction": "q", "output": \r')
    code, err = train_cli(monkeypatch, capsys, tmp_path, tiny_qwen2, data)
    assert_clean_refusal(code, err, tmp_path / "run", f"{data}:30001", "not valid JSON")
