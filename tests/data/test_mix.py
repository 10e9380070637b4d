"""Mixtures: a weight or a count of each file's records, drawn with the seed, reported, and kept by resume."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from lowtune.config import DataFile, load_config
from lowtune.data.mix import draw
from lowtune.data.read import read_examples
from lowtune.data.run_data import prepare_data
from lowtune.data.templates import QwenFormat
from lowtune.errors import UserError
from lowtune.eval.inspect import inspect_data
from lowtune.eval.report import write_report
from tests.conftest import tiny_config, write_jsonl


def records(count: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag} question {i}", "input": "", "output": f"{tag} answer {i}"} for i in range(count)]


def mixture_config(tmp_path, model, seed=0, a="weight: 0.3", b="samples: 5", **train):
    first = write_jsonl(tmp_path / "a.jsonl", records(20, "a"))
    second = write_jsonl(tmp_path / "b.jsonl", records(10, "b"))
    files = f"data.files=[{{path: {first}, {a}}}, {{path: {second}, {b}}}]"
    return tiny_config(model, first, tmp_path / "run", [files, f"train.seed={seed}", "data.template=qwen"], **train)


def test_a_weight_draws_a_share_and_samples_a_count(tmp_path, tiny_qwen2, qwen_tokenizer):
    config = mixture_config(tmp_path, tiny_qwen2)
    prepared = prepare_data(config, QwenFormat(qwen_tokenizer))
    counts = [drawn.count for drawn in prepared.mixture.drawn]
    assert counts == [6, 5] and len(prepared.records) == 11
    sources = [each.source(index) for each, index in prepared.records]
    assert sum(source.startswith(str(tmp_path / "a.jsonl")) for source in sources) == 6
    assert (
        prepared.mixture.describe()
        == "mixture: a.jsonl 6 of 20 records (weight 0.3), b.jsonl 5 of 10 records (samples 5)"
    )


def test_the_draw_depends_only_on_the_seed_and_the_file(tmp_path):
    entry = DataFile(path="a.jsonl", weight=0.5)
    first, again = draw(entry, "a.jsonl", 100, 1, 0), draw(entry, "a.jsonl", 100, 1, 0)
    other_seed, other_place = draw(entry, "a.jsonl", 100, 2, 0), draw(entry, "a.jsonl", 100, 1, 1)
    assert np.array_equal(first.indices, again.indices) and first.count == 50
    assert not np.array_equal(first.indices, other_seed.indices)
    assert not np.array_equal(first.indices, other_place.indices)
    assert list(first.indices) == sorted(first.indices) and len(set(first.indices.tolist())) == 50


def test_read_examples_draws_the_same_records_as_training(tmp_path, tiny_qwen2, qwen_tokenizer):
    config = mixture_config(tmp_path, tiny_qwen2, seed=3)
    prepared = prepare_data(config, QwenFormat(qwen_tokenizer))
    examples = read_examples(config.data.files, seed=3)
    assert [example.source for example in examples] == [each.source(index) for each, index in prepared.records]
    assert [e.source for e in read_examples(config.data.files, seed=4)] != [e.source for e in examples]


def test_the_mixture_is_logged_once_and_in_inspect_and_the_report(tmp_path, tiny_qwen2, qwen_tokenizer, caplog):
    config = mixture_config(tmp_path, tiny_qwen2)
    with caplog.at_level(logging.INFO):
        prepare_data(config, QwenFormat(qwen_tokenizer))
    assert sum("mixture: a.jsonl 6 of 20 records" in message for message in caplog.messages) == 1
    report = inspect_data(config)
    summary = dict(report.summary())
    assert summary["records read"] == "11" and summary["  a.jsonl"] == "6 of 20 (weight 0.3)"
    assert summary["  b.jsonl"] == "5 of 10 (samples 5)"
    assert report.to_dict()["mixture"][0] == {
        "file": str(tmp_path / "a.jsonl"),
        "records": 20,
        "drawn": 6,
        "weight": 0.3,
        "samples": None,
    }
    (tmp_path / "out").mkdir()
    text = write_report(tmp_path / "out", config, data=report).read_text(encoding="utf-8")
    assert "| a.jsonl | 6 of 20 (weight 0.3) |" in text


def test_more_samples_than_records_names_both_numbers(tmp_path, tiny_qwen2, qwen_tokenizer):
    config = mixture_config(tmp_path, tiny_qwen2, b="samples: 11")
    with pytest.raises(UserError) as caught:
        prepare_data(config, QwenFormat(qwen_tokenizer))
    message = str(caught.value)
    assert "samples: 11 asks for more records than the file has (10)" in message and "b.jsonl" in message
    assert "without replacement" in message


def test_resume_keeps_the_draw_and_refuses_another(tmp_path, tiny_qwen2):
    from lowtune.recipe import prepare, run

    config = mixture_config(tmp_path, tiny_qwen2, max_steps=2, save_steps=2)
    run(config)
    checkpoint_digest = (tmp_path / "run" / "checkpoint-2" / "fingerprint.json").read_text()
    assert prepare(config, check_output=False).mixture.digest() in checkpoint_digest
    config.train.max_steps = 3
    assert run(config, resume="latest") == tmp_path / "run"  # the same draw: resumed
    changed = mixture_config(tmp_path, tiny_qwen2, a="weight: 0.4", max_steps=4, save_steps=2)
    with pytest.raises(UserError) as caught:
        run(changed, resume="latest")
    assert "data mixture (the records drawn) changed since the checkpoint" in str(caught.value)


def test_weight_and_samples_are_validated_with_the_config(tmp_path):
    for value, needle in [
        ("{path: a.jsonl, weight: 0.5, samples: 3}", "weight 0.5 and samples 3 both given"),
        ("{path: a.jsonl, weight: 0}", "greater than 0"),
        ("{path: a.jsonl, weight: 1.5}", "less than or equal to 1"),
        ("{path: a.jsonl, samples: 0}", "greater than 0"),
    ]:
        with pytest.raises(UserError) as caught:
            load_config(None, [f"data.files=[{value}]"])
        assert needle in str(caught.value) and "fix: give a file weight" in str(caught.value), value
