"""The encoded-set cache: a hit gives the same rows, any change of data, tokenizer, template or length misses, and a
damaged entry is encoded again."""

from __future__ import annotations

import copy
import logging

import pytest

from lowtune.config import DataFile
from lowtune.data import cache
from lowtune.data.run_data import prepare_data, read_files
from lowtune.data.templates import QwenFormat, SeedFormat
from tests.conftest import MEMORISE, tiny_config, write_jsonl

HIT = "encoded set read from cache"


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(folder))
    monkeypatch.setattr(cache, "MIN_CACHED_BYTES", 0)
    return folder


def encoded_rows(path, chat_format, max_length=64, caplog=None):
    drawn = read_files([DataFile(path=str(path))], "auto", "\n", chat_format, max_length, seed=0)
    drawn.save_to_cache()
    return list(drawn.records.rows())


def hits(caplog) -> int:
    return sum(HIT in message for message in caplog.messages)


def test_a_second_encoding_reads_the_cache_and_gives_the_same_rows(tmp_path, cache_folder, qwen_tokenizer, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    with caplog.at_level(logging.INFO):
        first = encoded_rows(data, QwenFormat(qwen_tokenizer))
        assert hits(caplog) == 0 and len(list(cache_folder.iterdir())) == 1
        assert encoded_rows(data, QwenFormat(qwen_tokenizer)) == first and hits(caplog) == 1


def test_any_change_of_what_encodes_the_data_misses(tmp_path, cache_folder, qwen_tokenizer, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    encoded_rows(data, QwenFormat(qwen_tokenizer))
    other_tokenizer = copy.deepcopy(qwen_tokenizer)
    other_tokenizer.add_tokens(["<|new|>"])
    with caplog.at_level(logging.INFO):
        encoded_rows(data, SeedFormat(qwen_tokenizer))  # the template
        encoded_rows(data, QwenFormat(qwen_tokenizer), max_length=32)
        encoded_rows(data, QwenFormat(other_tokenizer))
        encoded_rows(data, QwenFormat(qwen_tokenizer, system="another system prompt"))
        write_jsonl(data, MEMORISE[:3])  # the data
        encoded_rows(data, QwenFormat(qwen_tokenizer))
    assert hits(caplog) == 0 and len(list(cache_folder.iterdir())) == 6


def test_a_damaged_entry_is_removed_and_encoded_again(tmp_path, cache_folder, qwen_tokenizer, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    first = encoded_rows(data, QwenFormat(qwen_tokenizer))
    (entry,) = cache_folder.iterdir()
    ids = entry / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:-4] + b"\0\0\0\0")
    with caplog.at_level(logging.INFO):
        assert encoded_rows(data, QwenFormat(qwen_tokenizer)) == first
    assert hits(caplog) == 0 and any("damaged encoded-set cache" in m for m in caplog.messages)
    (entry / "meta.json").write_text("{")
    assert encoded_rows(data, QwenFormat(qwen_tokenizer)) == first


def test_a_run_writes_the_cache_only_once_its_data_is_valid(tmp_path, cache_folder, tiny_qwen2, qwen_tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", MEMORISE)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q"}])
    config = tiny_config(tiny_qwen2, good, tmp_path / "run", [f"data.files=[{good}, {bad}]"])
    with pytest.raises(Exception, match="missing field 'output'"):
        prepare_data(config, QwenFormat(qwen_tokenizer))
    assert not cache_folder.exists()


def test_a_cache_hit_logs_the_mixture_once(tmp_path, cache_folder, tiny_qwen2, qwen_tokenizer, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE * 5)
    config = tiny_config(tiny_qwen2, data, tmp_path / "run", [f"data.files=[{{path: {data}, samples: 7}}]"])
    first = prepare_data(config, QwenFormat(qwen_tokenizer))
    with caplog.at_level(logging.INFO):
        again = prepare_data(config, QwenFormat(qwen_tokenizer))
    assert hits(caplog) == 1 and sum("mixture:" in m for m in caplog.messages) == 1
    assert list(again.train.rows) == list(first.train.rows) and again.mixture.digest() == first.mixture.digest()


def test_off_disables_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    assert cache.cache_root() is None and not cache.cacheable(write_jsonl(tmp_path / "d.jsonl", MEMORISE))
