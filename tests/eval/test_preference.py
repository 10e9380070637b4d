"""`lowtune eval` on pairs: a DPO run's held-out figures as training measured them, against the run's starting point;
an SFT file on a DPO run and pairs on an SFT run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from rich.console import Console

from lowtune.data.preference import prepare_preference_data
from lowtune.data.templates import build_chat_format
from lowtune.errors import UserError
from lowtune.eval.evaluate import evaluate_run, results_table
from lowtune.eval.preference import held_out_pairs
from lowtune.model.load import load_tokenizer
from lowtune.recipe import run
from tests.conftest import MEMORISE, tiny_config, write_jsonl
from tests.train.test_preference import PAIRS

FIGURES = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "accuracy")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_qwen2, tiny_run):
    """DPO from the tiny SFT run (its reference), its 4 pairs held out through data.eval_files."""
    folder = tmp_path_factory.mktemp("dpo")
    pairs = write_jsonl(folder / "pairs.jsonl", PAIRS * 2)
    held_out = write_jsonl(folder / "held.jsonl", PAIRS)
    config = tiny_config(tiny_qwen2, pairs, folder / "run", [f"data.eval_files=[{held_out}]"], max_steps=8)
    config.train.method, config.train.init_adapter = "dpo", str(tiny_run)
    return run(config)


def _copy(run_folder, tmp_path):
    return shutil.copytree(run_folder, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard"))


def test_a_dpo_run_is_evaluated_on_its_held_out_pairs_as_training_measured_them(tmp_path, dpo_run):
    folder = _copy(dpo_run, tmp_path)
    results = evaluate_run(folder, base=True)
    state = json.loads((folder / "trainer_state.json").read_text())
    last = [entry for entry in state["log_history"] if "eval_accuracy" in entry][-1]
    adapter, base = results["models"]["adapter"], results["models"]["base"]
    assert results["pairs"] == len(PAIRS) and results["data"].startswith("data.eval_files: ")
    assert "reference: train.init_adapter" in results["rewards"]
    for name in FIGURES:  # the reference is the SFT adapter, as in training, not the base
        assert adapter[name] == pytest.approx(last[f"eval_{name}"], rel=1e-3, abs=1e-4)
    assert adapter["accuracy"] == 1.0 and all(math.isfinite(base[name]) for name in FIGURES)
    assert json.loads((folder / "eval_results.json").read_text(encoding="utf-8")) == results
    lines = [json.loads(line) for line in (folder / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["prompt"] for line in lines] == [pair["prompt"] for pair in PAIRS]
    mean_margin = sum(line["adapter"]["margin"] for line in lines) / len(lines)
    assert mean_margin == pytest.approx(adapter["reward_margin"]) and "margin" in lines[0]["base"]
    console = Console(record=True, width=160)
    console.print(results_table(results))
    table = console.export_text()
    assert "preference accuracy" in table and "100%" in table and "base" in table and "DPO rewards" in table


def test_an_orpo_run_is_evaluated_on_its_held_out_pairs_as_training_measured_them(tmp_path, tiny_qwen2):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    held_out = write_jsonl(tmp_path / "held.jsonl", PAIRS)
    config = tiny_config(tiny_qwen2, pairs, tmp_path / "orpo", [f"data.eval_files=[{held_out}]"], max_steps=8)
    config.train.method = "orpo"
    folder = _copy(run(config), tmp_path)
    results = evaluate_run(folder, base=True)
    state = json.loads((folder / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_accuracy" in entry]
    first, last = evaluations[0], evaluations[-1]
    adapter, base = results["models"]["adapter"], results["models"]["base"]
    assert results["pairs"] == len(PAIRS) and results["rewards"].startswith("ORPO rewards: each reply's mean")
    for name in FIGURES:  # the rewards are each reply's mean log-probability: no reference
        assert adapter[name] == pytest.approx(last[f"eval_{name}"], rel=1e-3, abs=1e-4)
        assert base[name] == pytest.approx(first[f"eval_{name}"], rel=1e-3, abs=1e-4)  # the run's opening eval
    assert adapter["rewards_chosen"] > base["rewards_chosen"]  # the chosen replies trained: more likely now


def test_an_sft_file_on_a_dpo_run_is_evaluated_as_records(tmp_path, dpo_run):
    data = write_jsonl(tmp_path / "sft.jsonl", MEMORISE)
    results = evaluate_run(_copy(dpo_run, tmp_path), data=data, max_new_tokens=16)
    adapter = results["models"]["adapter"]
    assert results["records"] == 4 and "pairs" not in results
    assert math.isfinite(adapter["eval_loss"]) and adapter["zh"]["records"] == 3 and "stop_rate" in adapter


def test_pairs_on_an_sft_run_are_scored_against_its_start_the_base(tmp_path, tiny_run):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    results = evaluate_run(_copy(tiny_run, tmp_path), data=pairs, base=True)
    adapter, base = results["models"]["adapter"], results["models"]["base"]
    assert results["pairs"] == len(PAIRS) and "beta 0.1" in results["rewards"] and "the base" in results["rewards"]
    # The SFT run memorised the chosen replies to these prompts (the rejected ones, to other prompts): against the
    # base, it prefers the chosen on most pairs; the base is its own reference.
    assert adapter["accuracy"] > 0.5 and adapter["reward_margin"] > 0
    assert base["reward_margin"] == pytest.approx(0, abs=1e-6) and base["accuracy"] == 0.0


def test_a_dpo_run_whose_reference_adapter_moved_says_so(tmp_path, dpo_run):
    folder = _copy(dpo_run, tmp_path)
    config_file = folder / "lowtune.yaml"
    config = config_file.read_text(encoding="utf-8")
    init_adapter = json.loads((folder / "run_summary.json").read_text())["config"]["train"]["init_adapter"]
    config_file.write_text(config.replace(init_adapter, str(tmp_path / "gone")), encoding="utf-8")
    with pytest.raises(UserError, match="train.init_adapter, its DPO reference, is not here"):
        evaluate_run(folder)


def test_held_out_pairs_are_the_ones_training_held_out(tmp_path, tiny_qwen2):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    config = tiny_config(tiny_qwen2, data, tmp_path / "run", method="orpo", seed=3)
    with pytest.raises(UserError, match="no held-out pairs"):
        held_out_pairs(config, None)
    config.data.val_size = 3
    chat_format = build_chat_format("auto", load_tokenizer(config.model))
    pairs, described = held_out_pairs(config, None)
    assert pairs == prepare_preference_data(config, chat_format).held_out.pairs and "val_size 3" in described
    assert len(pairs) == 3 and held_out_pairs(config, data)[0][0].chosen == PAIRS[0]["chosen"]
