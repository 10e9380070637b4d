"""The training recipe end to end on tiny models: every CPU precision x quantization learns, the CLI writes a run."""

from __future__ import annotations

import json
import sys

import pytest

from lowtune.config import load_config
from lowtune.recipe import run
from tests.conftest import MEMORISE, tiny_config, write_jsonl

CPU_COMBINATIONS = [
    ("fp32", "none", {}),
    ("bf16", "none", {}),
    ("fp16", "none", {}),
    ("bf16", "8bit", {}),
    ("fp32", "4bit", {}),
    ("bf16", "4bit", {}),
    ("bf16", "4bit", {"quant_type": "fp4", "double_quant": False}),
]


@pytest.mark.parametrize(("precision", "quantization", "extra"), CPU_COMBINATIONS)
def test_every_cpu_precision_and_quantization_learns(tmp_path, tiny_qwen2, precision, quantization, extra):
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    config = tiny_config(tiny_qwen2, data, tmp_path / "run", max_steps=12, learning_rate=1e-2)
    config.model.precision, config.model.quantization = precision, quantization
    for key, value in extra.items():
        setattr(config.model, key, value)
    summary = json.loads((run(config) / "run_summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["last_logged_loss"] < 0.6 * summary["first_logged_loss"]


def test_runs_are_reproducible_and_take_callbacks_of_their_callers(tmp_path, tiny_qwen2):
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        ended: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ended.append(state.global_step)

    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    losses = []
    for name in ("a", "b"):
        run(tiny_config(tiny_qwen2, data, tmp_path / name, max_steps=3), callbacks=[Steps()])
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        losses.append([entry["loss"] for entry in state["log_history"] if "loss" in entry])
    assert losses[0] == losses[1]
    assert Steps.ended == [1, 2, 3] * 2


def test_checkpointing_settings_train_the_same_run(tmp_path, tiny_qwen2):
    """true recomputes the layers: the losses are those of no checkpointing (offload, a GPU setting, is refused on the
    CPU: tests/train/test_resolve.py; its host copies are tested in tests/model/test_checkpointing.py)."""
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    losses = {}
    for setting in (False, True):
        config = tiny_config(tiny_qwen2, data, tmp_path / str(setting), max_steps=3)
        config.train.gradient_checkpointing = setting
        state = json.loads((run(config) / "trainer_state.json").read_text())
        losses[setting] = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses[False]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def cli(monkeypatch, *args: str) -> int:
    from lowtune.cli import main

    monkeypatch.setattr(sys, "argv", ["lowtune", *args])
    with pytest.raises(SystemExit) as exited:
        main()
        raise SystemExit(0)
    return exited.value.code


def test_cli_train_writes_a_complete_run(tmp_path, tiny_qwen2, monkeypatch):
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    config = tmp_path / "c.yaml"
    config.write_text(tiny_config(tiny_qwen2, data, tmp_path / "unused").to_yaml(), encoding="utf-8")
    output = tmp_path / "run"
    code = cli(
        monkeypatch,
        "train",
        str(config),
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--output-dir",
        str(output),
        "--set",
        "train.logging_steps=2",
    )
    assert code == 0
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_format.json",
        "lowtune.yaml",
        "run_summary.json",
        "trainer_state.json",
    ):
        assert (output / name).is_file(), name
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        for name in ("adapter_model.safetensors", "lowtune.yaml", "chat_format.json", "optimizer.pt"):
            assert (output / checkpoint / name).is_file(), f"{checkpoint}/{name}"
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    saved = load_config(output / "lowtune.yaml")
    assert saved.train.max_steps == 4 and saved.train.logging_steps == 2 and saved.output_dir == str(output)


def test_held_out_records_are_evaluated_during_training_and_reported(tmp_path, tiny_qwen2):
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE * 2)
    config = tiny_config(tiny_qwen2, data, tmp_path / "run", max_steps=7, learning_rate=1e-2)
    config.data.val_size = 2
    config.train.eval_steps = 3
    output = run(config)
    state = json.loads((output / "trainer_state.json").read_text())
    evaluated = [(entry["step"], entry["eval_loss"]) for entry in state["log_history"] if "eval_loss" in entry]
    assert [step for step, _ in evaluated] == [0, 3, 6, 7]  # the base model first, every 3 steps, and the end
    assert evaluated[-1][1] < evaluated[0][1]
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["records"]["read"] == 8 and summary["records"]["trained"] == 6
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (output / "report.md").read_text(encoding="utf-8")
    assert "loss.png" in report and "eval" in report.lower()


def test_the_run_folder_records_the_choices_the_log_announced(tmp_path, tiny_qwen2, caplog):
    import logging

    import yaml

    caplog.set_level(logging.INFO, logger="lowtune.train.resolve")
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    output = run(tiny_config(tiny_qwen2, data, tmp_path / "run", max_steps=2, save_steps=2))
    announced = {}
    for record in (record for record in caplog.records if record.name == "lowtune.train.resolve"):
        if record.getMessage().startswith("planned peak host memory"):
            continue  # the plan's line, not a choice
        name, _, rest = record.getMessage().partition(": ")
        announced[name.replace(" ", "_")] = rest
    saved = yaml.safe_load((output / "resolved.yaml").read_text())
    assert saved == yaml.safe_load((output / "checkpoint-2" / "resolved.yaml").read_text())
    assert set(saved["choices"]) == set(announced) - {"warnings"}
    for name, value in saved["choices"].items():
        scalars = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        assert all(str(scalar) in announced[name] for scalar in scalars), name
    assert saved["choices"]["precision"] == "fp32" and saved["choices"]["device"] == "cpu"
    assert saved["reasons"]["precision"] == "model.precision"


def test_plan_prints_every_choice_before_loading_weights(tmp_path, tiny_qwen2, monkeypatch, capsys):
    from lowtune import recipe

    def no_weights(*args, **kwargs):
        raise AssertionError("lowtune plan loaded weights")

    monkeypatch.setattr(recipe, "load_weights", no_weights)
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    config = tmp_path / "c.yaml"
    config.write_text(tiny_config(tiny_qwen2, data, tmp_path / "run").to_yaml(), encoding="utf-8")
    assert cli(monkeypatch, "plan", str(config)) == 0
    printed = capsys.readouterr().out
    for row in ("precision", "fused lora", "base weights", "attention", "batching", "gradient checkpointing", "peak"):
        assert row in printed, row
    assert "Planned peak host memory (CPU)" in printed and "CPU (host memory)" in printed  # not GPU memory
