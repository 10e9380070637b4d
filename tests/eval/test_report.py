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
