"""report.md: training summary, loss figure, data statistics with histogram, sample generations, config."""

from __future__ import annotations

import json

from PIL import Image

from lowtune.config import load_config
from lowtune.data.read import read_examples
from lowtune.data.templates import QwenFormat
from lowtune.eval.inspect import analyse_examples
from lowtune.eval.report import write_report
from tests.conftest import MEMORISE, write_jsonl

SUMMARY = {"steps": 30, "epochs": 7.54401805869, "train_loss": 4.1, "first_logged_loss": 13.6, "last_logged_loss": 1.9}


def test_report_holds_every_part_and_its_figures(tmp_path, qwen_tokenizer):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_summary.json").write_text(json.dumps(SUMMARY | {"device": "cpu"}))
    examples = read_examples([str(write_jsonl(tmp_path / "m.jsonl", MEMORISE))])
    data = analyse_examples(examples, QwenFormat(qwen_tokenizer), max_length=64)
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.0, "step": 2}, {"eval_loss": 1.5, "step": 2}]
    samples = [{"prompt": "你是谁？", "reference": "家父是大理寺少卿甄远道。", "response": "```a```", "stopped": False}]
    config = load_config(None, [f"output_dir={run}"])
    text = write_report(run, config, history, data, samples).read_text(encoding="utf-8")
    assert "| steps | 30 |" in text and "| epochs | 7.54 |" in text  # rounded to two decimals
    assert "| first / last logged loss | 13.6 / 1.9 |" in text
    assert "![train and eval loss](loss.png)" in text and "Last eval loss: 1.5000 at step 2." in text
    assert "![token lengths](length_histogram.png)" in text and "| records read | 4 |" in text
    assert "Reply (ran to the token limit):\n\n````text\n```a```\n````" in text
    assert f"```yaml\n{config.to_yaml().rstrip()}\n```" in text
    for name in ("loss.png", "length_histogram.png"):
        with Image.open(run / name) as image:
            assert image.format == "PNG"


def test_report_without_history_data_or_samples_has_the_config_only(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}"])
    text = write_report(tmp_path, config).read_text(encoding="utf-8")
    assert text.startswith(f"# lowtune run `{tmp_path.name}`") and "## Config" in text
    assert "## Loss" not in text and "## Data" not in text and not (tmp_path / "loss.png").exists()


def test_report_of_a_preference_run_shows_its_held_out_pairs_last_and_per_evaluation(tmp_path):
    last = {"loss": 0.41, "rewards_chosen": 0.3, "rewards_rejected": -0.9, "reward_margin": 1.2, "accuracy": 0.875}
    preference = {"method": "dpo (beta 0.1)", "pairs": 40, "held_out_pairs": 8, "last_eval": last}
    (tmp_path / "run_summary.json").write_text(json.dumps(SUMMARY | {"preference": preference}))
    evaluation = {f"eval_{name}": value for name, value in last.items()}
    history = [
        {"eval_loss": 0.69, "eval_rewards_chosen": 0.0, "eval_rewards_rejected": 0.0, "eval_reward_margin": 0.0}
        | {"eval_accuracy": 0.0, "step": 0},
        {"loss": 0.5, "reward_margin": 0.8, "step": 5},
        evaluation | {"step": 10},
    ]
    text = write_report(tmp_path, load_config(None, [f"output_dir={tmp_path}"]), history).read_text(encoding="utf-8")
    assert "## Preference (held-out pairs)" in text and "| pairs trained / held out | 40 / 8 |" in text
    assert "| preference accuracy | 88% |" in text and "| reward margin (mean) | 1.2000 |" in text
    assert "| chosen reward (mean) | 0.3000 |" in text and "| rejected reward (mean) | -0.9000 |" in text
    assert "| 0 | 0.6900 | 0% | 0.0000 | 0.0000 | 0.0000 |" in text
    assert "| 10 | 0.4100 | 88% | 1.2000 | 0.3000 | -0.9000 |" in text


def test_report_of_an_sft_run_has_no_preference_section(tmp_path):
    (tmp_path / "run_summary.json").write_text(json.dumps(SUMMARY | {"preference": None}))
    text = write_report(tmp_path, load_config(None, [f"output_dir={tmp_path}"])).read_text(encoding="utf-8")
    assert "| steps | 30 |" in text and "Preference" not in text
