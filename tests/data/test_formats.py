"""Every file type and record format, and the per-file column and role mapping: the same conversations and the same
encoded rows whatever the file, each record located by its line or row."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from lowtune.config import DataFile, load_config
from lowtune.data.encode import encode_examples
from lowtune.data.read import Message, read_examples
from lowtune.data.templates import QwenFormat
from lowtune.errors import UserError
from tests.conftest import write_jsonl

datasets = pytest.importorskip("datasets")
pyarrow_parquet = pytest.importorskip("pyarrow.parquet")

# One small set: a system prompt on one record, an input on another, a reply with a comma, quotes and a line break
# (what CSV has to quote), and Chinese text.
ALPACA = [
    {"instruction": "你是谁？", "input": "", "output": "家父是大理寺少卿甄远道。", "system": "你是甄嬛。"},
    {"instruction": "Translate", "input": "晴。", "output": 'It is "sunny",\nall day.', "system": ""},
    {"instruction": "Who are you?", "input": "", "output": "I am Zhen Huan.", "system": ""},
]


def user_turn(record: dict) -> str:
    return "\n".join(part for part in (record["instruction"], record["input"]) if part)


def as_chat(record: dict) -> dict:
    system = [{"role": "system", "content": record["system"]}] if record["system"] else []
    turns = [{"role": "user", "content": user_turn(record)}, {"role": "assistant", "content": record["output"]}]
    return {"messages": system + turns}


def as_sharegpt(record: dict) -> dict:
    turns = [{"from": "human", "value": user_turn(record)}, {"from": "gpt", "value": record["output"]}]
    return {"conversations": turns, "system": record["system"]}


def write_delimited(path: Path, records: list[dict], delimiter: str) -> Path:
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow

    pyarrow_parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


def write_in_every_format(folder: Path) -> dict[str, Path]:
    json_path = folder / "alpaca.json"
    json_path.write_text(json.dumps(ALPACA, ensure_ascii=False, indent=1), encoding="utf-8")
    sharegpt = folder / "sharegpt.json"
    sharegpt.write_text(json.dumps([as_sharegpt(r) for r in ALPACA], ensure_ascii=False, indent=1), encoding="utf-8")
    saved = folder / "saved"
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(saved))
    return {
        "alpaca JSON": json_path,
        "alpaca JSONL": write_jsonl(folder / "alpaca.jsonl", ALPACA),
        "chat JSONL": write_jsonl(folder / "chat.jsonl", [as_chat(r) for r in ALPACA]),
        "ShareGPT JSON": sharegpt,
        "Parquet": write_parquet(folder / "alpaca.parquet", ALPACA),
        "CSV": write_delimited(folder / "alpaca.csv", ALPACA, ","),
        "TSV": write_delimited(folder / "alpaca.tsv", ALPACA, "\t"),
        "save_to_disk folder": saved,
    }


def test_one_set_in_every_format_encodes_to_the_same_rows(tmp_path, qwen_tokenizer):
    chat_format = QwenFormat(qwen_tokenizer)
    rows = {
        name: encode_examples(read_examples([str(path)]), chat_format, 1024).rows
        for name, path in write_in_every_format(tmp_path).items()
    }
    reference = rows.pop("alpaca JSON")
    assert len(reference) == 3 and any(label != -100 for label in reference[0]["labels"])
    for name, encoded in rows.items():
        assert encoded == reference, name


def test_sharegpt_roles_system_and_lines(tmp_path):
    path = tmp_path / "s.jsonl"
    turns = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "u1"},
        {"from": "chatgpt", "value": "a1"},
        {"from": "user", "value": "u2"},
        {"from": "bard", "value": "a2"},
    ]
    write_jsonl(path, [{"conversations": turns[1:3], "system": "T"}, {"conversations": turns}])
    first, second = read_examples([str(path)])
    assert first.messages == (Message("system", "T"), Message("user", "u1"), Message("assistant", "a1"))
    assert [m.role for m in second.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert second.source == f"{path}:2"


def test_csv_rows_count_as_a_spreadsheet_shows_them(tmp_path):
    path = write_delimited(tmp_path / "a.csv", ALPACA, ",")  # the second record's reply spans two lines
    first, second, third = read_examples([str(path)])
    assert (first.source, second.source, third.source) == (f"{path}:2", f"{path}:3", f"{path}:4")
    assert second.messages[-1].content == 'It is "sunny",\nall day.' and first.system == "你是甄嬛。"


def test_parquet_and_a_dataset_dicts_train_split(tmp_path, caplog):
    parquet = write_parquet(tmp_path / "a.parquet", ALPACA)
    assert [e.source for e in read_examples([str(parquet)])] == [f"{parquet}:{n}" for n in (1, 2, 3)]
    folder = tmp_path / "dict"
    splits = {"train": datasets.Dataset.from_list(ALPACA), "test": datasets.Dataset.from_list(ALPACA[:1])}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    caplog.set_level(logging.INFO, logger="lowtune.data.columnar")
    examples = read_examples([str(folder)])
    assert len(examples) == 3 and examples[0].source == f"{folder / 'train'}:1"
    assert "reading its train split" in caplog.text and "train, test" in caplog.text
    assert len(read_examples([str(folder / "test")])) == 1


def test_a_stated_type_and_format_win_over_detection(tmp_path):
    path = write_delimited(tmp_path / "export.txt", ALPACA, "\t")
    examples = read_examples([DataFile(path=str(path), type="tsv", format="alpaca")])
    assert examples[2].messages[-1] == Message("assistant", "I am Zhen Huan.")


def test_alpaca_columns_mapped_in_parquet(tmp_path):
    renamed = [{"question": r["instruction"], "answer": r["output"], "prompt": r["system"]} for r in ALPACA]
    path = write_parquet(tmp_path / "qa.parquet", renamed)
    mapped = DataFile(path=str(path), columns={"instruction": "question", "output": "answer", "system": "prompt"})
    examples = read_examples([mapped])
    assert examples[0].messages == (
        Message("system", "你是甄嬛。"),
        Message("user", "你是谁？"),
        Message("assistant", "家父是大理寺少卿甄远道。"),
    )


def test_sharegpt_keys_and_role_names_mapped(tmp_path):
    turns = [{"speaker": "customer", "text": "hi"}, {"speaker": "agent", "text": "hello"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"dialog": turns}])
    mapped = DataFile(
        path=str(path),
        format="sharegpt",
        columns={"conversations": "dialog", "from": "speaker", "value": "text"},
        roles={"customer": "user", "agent": "assistant"},
    )
    (example,) = read_examples([mapped])
    assert example.messages == (Message("user", "hi"), Message("assistant", "hello"))


def test_chat_keys_mapped(tmp_path):
    turns = [{"who": "user", "text": "hi"}, {"who": "bot", "text": "hello"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"turns": turns}])
    mapped = DataFile(
        path=str(path), columns={"messages": "turns", "role": "who", "content": "text"}, roles={"bot": "assistant"}
    )
    (example,) = read_examples([mapped])
    assert example.messages == (Message("user", "hi"), Message("assistant", "hello"))


@pytest.mark.parametrize(
    ("entry", "line", "needle"),
    [
        ("columns: {instruction: q, answer: a}", 6, "data.files[1].columns: unknown field answer; the fields of format "
         "alpaca: instruction, input, output, system, history"),
        ("roles: {bot: assistant}", 4, "data.files[1]: roles apply to the chat and sharegpt formats"),
        ("type: xlsx", 6, "data.files[1].type: Input should be 'auto', 'json'"),
    ],
)  # fmt: skip
def test_a_mapping_in_the_config_is_validated_with_its_line(tmp_path, entry, line, needle):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"data:\n  files:\n    - a.jsonl\n    - path: b.parquet\n      format: alpaca\n      {entry}\n",
        encoding="utf-8",
    )
    with pytest.raises(UserError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert problem.line == line and needle in problem.message


def test_a_string_entry_stays_a_string_in_the_saved_config(tmp_path):
    config = load_config(None, ["data.files=[a.jsonl, {path: b.csv, columns: {instruction: q}}]"])
    assert config.data.files[0] == DataFile(path="a.jsonl") and str(config.data.files[1]) == "b.csv"
    dumped = config.model_dump(mode="json")["data"]["files"]
    assert dumped[0] == "a.jsonl" and dumped[1]["columns"] == {"instruction": "q"}


def test_data_inspect_reads_parquet(tmp_path, tiny_qwen2, monkeypatch, capsys):
    import sys

    from lowtune.cli import main

    path = write_parquet(tmp_path / "a.parquet", ALPACA)
    out = tmp_path / "inspect"
    arguments = ["data", "inspect", "--data", str(path), "--out", str(out), "--set", f"model.path={tiny_qwen2}"]
    monkeypatch.setattr(sys, "argv", ["lowtune", *arguments])
    main()
    assert f"{path.name}:3" in capsys.readouterr().out
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    assert report["records"] == 3 and report["files"] == {str(path): 3}


@pytest.mark.parametrize("module", ["pyarrow", "datasets"])
def test_without_the_data_extra_the_message_says_what_to_install(tmp_path, monkeypatch, module):
    import sys

    parquet = write_parquet(tmp_path / "a.parquet", ALPACA)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(saved))
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "pyarrow.parquet", raising=False)
    with pytest.raises(UserError) as caught:
        read_examples([str(parquet if module == "pyarrow" else saved)])
    (problem,) = caught.value.problems
    assert f"needs {module}, which is not installed" in problem.message and problem.fix == 'pip install "lowtune[data]"'
