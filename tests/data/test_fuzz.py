"""Any bytes in, either records or a clean UserError out: the readers never raise anything else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowtune.data.read import read_examples
from lowtune.errors import UserError

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(["instruction", "input", "output", "system", "history", "messages", "role", "content", "x"])
RECORDS = st.dictionaries(
    KEYS, JSON_VALUES | st.lists(st.dictionaries(KEYS, JSON_VALUES, max_size=3), max_size=3), max_size=5
)


def read_bytes_as(raw: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(raw)
        assert_records_or_clean_error(lambda: read_examples([str(path)]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([".json", ".jsonl"]))
def test_random_bytes(raw, suffix):
    read_bytes_as(raw, suffix)


@settings(max_examples=300, deadline=None)
@given(st.lists(RECORDS, max_size=5), st.booleans())
def test_random_json_records(records, as_array):
    if as_array:
        read_bytes_as(json.dumps(records, ensure_ascii=False).encode(), ".json")
    else:
        read_bytes_as("\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode(), ".jsonl")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_random_text(text):
    read_bytes_as(text.encode("utf-8", errors="surrogatepass"), ".jsonl")


# The new readers: CSV and TSV text, Parquet bytes (random, and a real file damaged), datasets folders with a
# damaged Arrow file, and ShareGPT records.
SHAREGPT_KEYS = st.sampled_from(["conversations", "from", "value", "system", "tools", "human", "gpt", "tool", "x"])
SHAREGPT_RECORDS = st.dictionaries(
    SHAREGPT_KEYS,
    JSON_VALUES | st.lists(st.dictionaries(SHAREGPT_KEYS, JSON_VALUES | SHAREGPT_KEYS, max_size=3), max_size=4),
    max_size=4,
)
CELLS = st.text(alphabet=st.sampled_from('ab "\t,\n\r\\q'), max_size=12)


def assert_records_or_clean_error(read) -> None:
    try:
        examples = read()
    except UserError as error:
        assert error.problems and all(str(problem) for problem in error.problems)
        return
    assert examples and all(example.messages[-1].role == "assistant" for example in examples)


def parquet_bytes(records: list[dict]) -> bytes:
    import io

    import pyarrow
    import pyarrow.parquet

    buffer = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), buffer)
    return buffer.getvalue()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(CELLS, max_size=4), max_size=5), st.sampled_from([".csv", ".tsv"]))
def test_random_delimited_text(rows, suffix):
    delimiter = "\t" if suffix == ".tsv" else ","
    header = "instruction" + delimiter + "output\n"
    read_bytes_as((header + "\n".join(delimiter.join(row) for row in rows)).encode(), suffix)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([".csv", ".tsv", ".parquet"]))
def test_random_bytes_as_the_new_types(raw, suffix):
    read_bytes_as(raw, suffix)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_damaged_parquet(data):
    pytest.importorskip("pyarrow")
    raw = bytearray(parquet_bytes([{"instruction": "q", "output": "a", "system": None}] * 3))
    cut = data.draw(st.integers(0, len(raw)))
    for _ in range(data.draw(st.integers(0, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    read_bytes_as(bytes(raw[: cut or len(raw)]), ".parquet")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["instruction", "input", "output", "system"]), CELLS), max_size=4))
def test_random_parquet_records(records):
    pytest.importorskip("pyarrow")
    read_bytes_as(parquet_bytes(records) if records else b"", ".parquet")


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_damaged_datasets_folder(data):
    datasets = pytest.importorskip("datasets")
    with tempfile.TemporaryDirectory() as folder:
        datasets.Dataset.from_list([{"instruction": "q", "output": "a"}] * 3).save_to_disk(folder)
        for path in sorted(Path(folder).iterdir()):
            raw = bytearray(path.read_bytes())
            if raw and data.draw(st.booleans()):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
                path.write_bytes(bytes(raw[: data.draw(st.integers(1, len(raw)))]))
        assert_records_or_clean_error(lambda: read_examples([folder]))


@settings(max_examples=300, deadline=None)
@given(st.lists(SHAREGPT_RECORDS, max_size=4))
def test_random_sharegpt_records(records):
    read_bytes_as(json.dumps(records, ensure_ascii=False).encode(), ".json")
