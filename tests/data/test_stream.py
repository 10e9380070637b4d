"""Large files: read a line or a batch at a time in bounded memory, encoded into compact numpy arrays."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from lowtune.data.encoded import Records, encode_conversations
from lowtune.data.files import read_file_records
from lowtune.data.read import Message, read_examples
from lowtune.data.templates import QwenFormat, SeedFormat, TokenizerFormat

RECORD = '{"instruction": "question number %d, with some words", "input": "", "output": "the answer to %d"}\n'


@pytest.fixture(scope="module")
def large_jsonl(tmp_path_factory):
    """200,000 records, about 17 MB."""
    path = tmp_path_factory.mktemp("large") / "large.jsonl"
    with path.open("w", encoding="utf-8") as stream:
        stream.writelines(RECORD % (i, i) for i in range(200_000))
    return path


def peak_while_reading(path, **kwargs) -> tuple[int, int]:
    """(records, peak traced bytes) of iterating every record of a file."""
    tracemalloc.start()
    count = sum(1 for _ in read_file_records(path, **kwargs))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return count, peak


def test_reading_a_large_jsonl_takes_bounded_memory(large_jsonl):
    count, peak = peak_while_reading(large_jsonl)
    assert count == 200_000
    assert peak < 2_000_000 < large_jsonl.stat().st_size // 8  # a few chunks, not the file


def test_reading_a_large_csv_takes_bounded_memory(tmp_path):
    path = tmp_path / "large.csv"
    with path.open("w", encoding="utf-8") as stream:
        stream.write("instruction,output\n")
        stream.writelines(f'"question {i}, quoted",answer {i}\n' for i in range(100_000))
    count, peak = peak_while_reading(path)
    assert count == 100_000 and peak < 2_000_000


def test_line_endings_of_every_kind_keep_their_line_numbers(tmp_path):
    for ending in ("\n", "\r\n", "\r"):
        path = tmp_path / "d.jsonl"
        lines = [RECORD.strip() % (1, 1), "", RECORD.strip() % (2, 2)]
        path.write_bytes(ending.join(lines).encode())
        assert [line for line, _ in read_file_records(path)] == [1, 3], repr(ending)


def test_a_byte_that_is_not_utf8_is_located_in_a_large_file(tmp_path):
    path = tmp_path / "d.jsonl"
    good = (RECORD % (1, 1)).encode() * 30_000  # past the reader's first chunks
    path.write_bytes(good + b'{"instruction": "\xff", "output": "a"}\n')
    with pytest.raises(Exception) as caught:
        list(read_file_records(path))
    assert f"{path}:30001: not UTF-8 text (byte {len(good) + 17}" in str(caught.value)


def test_the_encoded_set_holds_numpy_arrays_of_bounded_size(qwen_tokenizer):
    conversations = [((Message("user", f"q {i}"), Message("assistant", f"answer {i}")), i) for i in range(3_000)]
    tracemalloc.start()
    encoded = encode_conversations(conversations, QwenFormat(qwen_tokenizer), 64).build(file="f")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tokens = int(encoded.offsets[-1])
    assert encoded.ids.dtype == np.uint32 and encoded.trained.dtype == np.bool_  # Qwen's vocabulary is past 65,536
    assert encoded.nbytes() == tokens * 5 + len(encoded) * 32 + 8  # 4 + 1 bytes a token, 32 a record
    assert peak < 8 * encoded.nbytes() + 4_000_000  # buffers and one batch of Python lists, not a list per token
    rows = Records.whole([encoded]).rows()
    assert len(rows) == 3_000 and rows.nbytes() == encoded.nbytes() + 3_000 * 8
    row = rows[5]
    assert set(row) == {"input_ids", "attention_mask", "labels"} and len(row["input_ids"]) == len(row["labels"])


@pytest.mark.parametrize("make", [QwenFormat, SeedFormat, TokenizerFormat])
def test_batched_encoding_gives_the_ids_of_one_segment_at_a_time(make, qwen_tokenizer):
    chat_format = make(qwen_tokenizer)
    conversations = [
        [Message("user", "你好 <|im_end|> there"), Message("assistant", "好")],
        [Message("system", "be brief"), Message("user", "Who?"), Message("assistant", "Zhen Huan.\n")],
        [Message("user", "q"), Message("assistant", "a"), Message("user", "again"), Message("assistant", "b")],
    ]
    for messages, (ids, labels) in zip(conversations, chat_format.encode_many(conversations), strict=True):
        expected_ids, expected_labels = [], []
        for segment in chat_format.segments(messages):
            segment_ids = chat_format.token_ids(segment)
            expected_ids += segment_ids
            expected_labels += segment_ids if segment.trained else [-100] * len(segment_ids)
        assert (ids, labels) == (expected_ids, expected_labels)


def test_a_large_file_reads_the_same_records_as_a_json_array(tmp_path):
    records = [json.loads(RECORD % (i, i)) for i in range(50)]
    lines, array = tmp_path / "d.jsonl", tmp_path / "d.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    array.write_text(json.dumps(records, indent=1), encoding="utf-8")
    assert [e.messages for e in read_examples([str(lines)])] == [e.messages for e in read_examples([str(array)])]
