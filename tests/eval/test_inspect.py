"""`data inspect` counts what max_length cuts and drops, finds duplicates, and renders the trained spans."""

from __future__ import annotations

import pytest
import transformers
from PIL import Image

from lowtune.data.encode import encode_examples
from lowtune.data.read import read_examples
from lowtune.data.templates import QwenFormat
from lowtune.eval.inspect import analyse_examples, inspect_data, save_inspection, text_histogram
from tests.conftest import tiny_config, write_jsonl

SHORT = {"instruction": "你好", "input": "", "output": "好"}
RECORDS = [
    SHORT,
    SHORT,  # an exact duplicate
    {"instruction": "甲" * 100, "input": "", "output": "好"},  # the cut leaves no trained token: dropped
    {"instruction": "你好", "input": "", "output": "乙" * 100},  # cut, but keeps part of its reply
    {"instruction": "Who are you?", "input": "", "output": "I am Zhen Huan."},
]
MAX_LENGTH = 64


@pytest.fixture
def config(tmp_path, tiny_qwen2):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    config = tiny_config(tiny_qwen2, data, tmp_path / "run")
    config.data.max_length, config.data.val_size, config.data.template = MAX_LENGTH, 2, "qwen"
    return config


def test_counts_truncation_drops_and_duplicates(config, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("data inspect must not load model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    report = inspect_data(config)
    source = str(config.data.files[0])
    assert report.files == {source: 5} and report.records == 5 and report.held_out == 2
    assert report.truncated == [f"{source}:3", f"{source}:4"]
    assert report.dropped == [f"{source}:3"]
    assert report.duplicates == [(f"{source}:2", f"{source}:1")]
    assert max(report.lengths) > MAX_LENGTH and min(report.lengths) < MAX_LENGTH
    stats = report.length_stats()
    assert stats["min"] <= stats["median"] <= stats["p95"] <= stats["max"]


def test_counts_agree_with_the_encoding_training_uses(config, qwen_tokenizer):
    examples = read_examples(config.data.files)
    chat_format = QwenFormat(qwen_tokenizer)
    report = analyse_examples(examples, chat_format, MAX_LENGTH)
    encoded = encode_examples(examples, chat_format, MAX_LENGTH)
    assert len(report.truncated) == encoded.truncated and report.dropped == encoded.dropped
    assert report.trained_tokens == encoded.trained_tokens


def test_samples_mark_the_trained_span_and_the_cut(config, qwen_tokenizer):
    report = analyse_examples(read_examples(config.data.files), QwenFormat(qwen_tokenizer), MAX_LENGTH, 2)
    first, truncated = report.samples
    assert first.plain().endswith("<|im_start|>assistant\n⟦好<|im_end|>⟧\n")
    assert first.plain().count("⟦") == 1 and "[bold green]好<|im_end|>[/]" in first.markup()
    assert truncated.source.endswith(":3") and truncated.cut_tokens > 0 and "✂" in truncated.plain()


def test_saved_files(config, tmp_path, qwen_tokenizer):
    report = analyse_examples(read_examples(config.data.files), QwenFormat(qwen_tokenizer), MAX_LENGTH)
    json_path, png_path, text_path = save_inspection(report, tmp_path / "inspect")
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.size == (700, 400)
    text = text_path.read_text(encoding="utf-8")
    assert "exact duplicates: 1" in text and "⟦好<|im_end|>⟧" in text and "█" in text
    assert '"dropped"' in json_path.read_text(encoding="utf-8")


def test_text_histogram_counts_every_record_and_marks_the_cut():
    lines = text_histogram([10, 20, 20, 30, 100], max_length=50, bins=3).splitlines()
    assert [int(line.split()[-2 if line.endswith("✂") else -1]) for line in lines] == [4, 0, 1]
    assert [line.endswith("✂") for line in lines] == [False, True, True]


def test_the_cut_never_splits_a_character(tmp_path, qwen_tokenizer):
    """Byte-level tokens can end inside a multi-byte character; the rendered cut drops that piece (no U+FFFD)."""
    chat_format = QwenFormat(qwen_tokenizer)
    rare = "𠀀𠀁𠀂𠀃𠀄𠀅𠀆𠀇"  # 4-byte characters, each several tokens in Qwen's vocabulary
    examples = read_examples([str(write_jsonl(tmp_path / "r.jsonl", [{"instruction": "你好", "output": rare}]))])
    input_ids, _ = chat_format.encode(examples[0].messages)
    splits = [n for n in range(1, len(input_ids)) if qwen_tokenizer.decode(input_ids[:n]).endswith("\ufffd")]
    assert splits, "the test needs a cut inside a character"
    for max_length in splits:
        (sample,) = analyse_examples(examples, chat_format, max_length, 1).samples
        assert "\ufffd" not in sample.plain() and sample.cut_tokens > 0
        shown = sample.plain().split("assistant\n")[-1].split("✂")[0].strip(" ⟦⟧")
        assert rare.startswith(shown)  # whole characters only


def test_trained_tokens_leave_the_held_out_records_out(config):
    report = inspect_data(config)
    examples = read_examples(config.data.files)
    from lowtune.data.split import split_for_run
    from lowtune.model.load import load_tokenizer

    train, held_out = split_for_run(config, examples)
    chat_format = QwenFormat(load_tokenizer(config.model))
    assert report.held_out == len(held_out) == 2
    assert report.trained_tokens == encode_examples(train, chat_format, MAX_LENGTH).trained_tokens
