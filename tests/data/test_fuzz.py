"""Any bytes in, either records or a clean UserError out: the readers never raise anything else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

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
        try:
            examples = read_examples([str(path)])
        except UserError as error:
            assert error.problems and all(str(problem) for problem in error.problems)
            return
        assert examples and all(example.messages[-1].role == "assistant" for example in examples)


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
