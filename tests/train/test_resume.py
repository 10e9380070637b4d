"""Never lose a run: exact resume after SIGKILL, Ctrl-C that saves, atomic checkpoints, refused mismatches, NaN stops.

The crash tests run `lowtune train` in a real subprocess through a small driver that adds one hook (kill itself at a
given moment), so the signals and the half-written files are real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lowtune.errors import RunStopped, UserError
from lowtune.recipe import run
from lowtune.train.resume import complete_checkpoints
from tests.conftest import MEMORISE, tiny_config, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def config_file(tmp_path: Path, model: Path, steps: int = 4, save_steps: int = 2) -> Path:
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE * 3)
    config = tiny_config(model, data, tmp_path / "run", max_steps=steps, save_steps=save_steps, learning_rate=1e-2)
    config.lora.dropout = 0.1  # dropout draws random numbers: resuming must restore the generator too
    config.train.save_total_limit = None
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml(), encoding="utf-8")
    return path


def driver(tmp_path: Path, hook: str) -> Path:
    """A `lowtune` entry point with one test hook installed before the CLI runs."""
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        from lowtune.train import trainer as trainer_module
        {textwrap.indent(textwrap.dedent(hook), "        ").strip()}
        from lowtune.cli import main
        sys.argv = ["lowtune"] + sys.argv[1:]
        main()
    """),
        encoding="utf-8",
    )
    return script


def lowtune(*args: str, script: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "lowtune"]
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=REPO, timeout=600, **kwargs)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def logged_losses(folder: Path) -> list[float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


KILL_AFTER_FIRST_CHECKPOINT = """
    save = trainer_module.LowtuneTrainer._save_checkpoint
    def save_then_die(self, model, trial):
        save(self, model, trial)
        os.kill(os.getpid(), signal.SIGKILL)
    trainer_module.LowtuneTrainer._save_checkpoint = save_then_die
"""


def test_resume_after_sigkill_gives_the_uninterrupted_adapter(tmp_path, tiny_qwen2):
    straight = tmp_path / "straight"
    straight.mkdir()
    done = lowtune("train", str(config_file(straight, tiny_qwen2)))
    assert done.returncode == 0, done.stderr

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    config = config_file(crashed, tiny_qwen2)
    killed = lowtune("train", str(config), script=driver(crashed, KILL_AFTER_FIRST_CHECKPOINT))
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in complete_checkpoints(crashed / "run")] == ["checkpoint-2"]
    assert lowtune("train", str(config)).returncode == 2  # the folder holds a run: no overwrite by accident
    resumed = lowtune("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    for name, tensor in adapter(straight / "run").items():
        torch.testing.assert_close(adapter(crashed / "run")[name], tensor, rtol=0, atol=1e-6)
    assert logged_losses(crashed / "run") == pytest.approx(logged_losses(straight / "run"), abs=1e-6)


KILL_WHILE_SAVING = """
    save = trainer_module.LowtuneTrainer._save_checkpoint
    def save(self, model, trial, _save=save):
        if self.state.global_step == 4:  # die halfway through the second checkpoint's files
            self.checkpoint_files = lambda folder: os.kill(os.getpid(), signal.SIGKILL)
        _save(self, model, trial)
    trainer_module.LowtuneTrainer._save_checkpoint = save
"""


def test_a_kill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path, tiny_qwen2):
    config = config_file(tmp_path, tiny_qwen2, steps=6)
    killed = lowtune("train", str(config), script=driver(tmp_path, KILL_WHILE_SAVING))
    assert killed.returncode == -signal.SIGKILL
    output = tmp_path / "run"
    assert [p.name for p in complete_checkpoints(output)] == ["checkpoint-2"]
    assert (output / ".tmp-checkpoint-4").is_dir()  # the half-written one, never renamed
    resumed = lowtune("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumingfrom" in "".join(resumed.stderr.split()) and "checkpoint-2" in "".join(resumed.stderr.split())
    assert not (output / ".tmp-checkpoint-4").exists()
    assert json.loads((output / "run_summary.json").read_text())["steps"] == 6


SLOW_STEPS = """
    from transformers import TrainerCallback
    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            Path(args.output_dir, f"step-{state.global_step}.mark").touch()
            time.sleep(0.5)
    build = trainer_module.build_trainer
    def build_slow(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(Slow())
        return trainer
    import lowtune.recipe as recipe
    recipe.build_trainer = build_slow
"""


def slow_run_at_step(tmp_path: Path, model: Path, step: int) -> tuple[subprocess.Popen, Path]:
    """A long run with half-second steps, once it has finished `step` steps."""
    config = config_file(tmp_path, model, steps=200, save_steps=0)
    output = tmp_path / "run"
    command = [sys.executable, str(driver(tmp_path, SLOW_STEPS)), "train", str(config)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (output / f"step-{step}.mark").exists():
        assert process.poll() is None and time.time() < deadline, process.stderr.read() if process.stderr else ""
        time.sleep(0.05)
    return process, output


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_qwen2, signal_number):
    process, output = slow_run_at_step(tmp_path, tiny_qwen2, 3)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal_number, stderr
    checkpoints = complete_checkpoints(output)
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) < 200
    assert "--resume" in stderr and "Traceback" not in stderr


def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_qwen2):
    process, _ = slow_run_at_step(tmp_path, tiny_qwen2, 2)
    process.send_signal(signal.SIGINT)
    time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in stderr


def test_resume_refuses_a_changed_run_and_lists_the_changes(tmp_path, tiny_qwen2):
    config = tiny_config(
        tiny_qwen2, write_jsonl(tmp_path / "m.jsonl", MEMORISE), tmp_path / "run", max_steps=2, save_steps=2
    )
    run(config)
    config.lora.r, config.train.learning_rate = 4, 1e-3
    with pytest.raises(UserError) as caught:
        run(config, resume="latest")
    message = str(caught.value)
    assert "lora.r: 8 -> 4" in message and "train.learning_rate" in message and "--force" in message
    write_jsonl(tmp_path / "m.jsonl", MEMORISE[:2])  # the data changed under the same path
    config.lora.r, config.train.learning_rate = 8, 1e-2
    with pytest.raises(UserError, match="data file .* changed"):
        run(config, resume="latest")


def test_resume_refuses_a_checkpoint_whose_choices_this_machine_makes_differently(tmp_path, tiny_qwen2, monkeypatch):
    """precision: auto gave bf16 on a CPU with AMX; the same config on an AVX2-only CPU resolves fp32: another run."""
    from dataclasses import replace

    from lowtune import machine

    config = tiny_config(
        tiny_qwen2, write_jsonl(tmp_path / "m.jsonl", MEMORISE), tmp_path / "run", max_steps=2, save_steps=2
    )
    config.model.precision = "auto"
    here = machine.this_machine()
    amx = replace(here, cpu=machine.Cpu("Xeon", "GenuineIntel", frozenset({"avx2", "avx512f", "amx_bf16"})))
    monkeypatch.setattr(machine, "_DETECTED", amx)
    run(config)
    assert "precision: bf16" in (tmp_path / "run" / "checkpoint-2" / "resolved.yaml").read_text()
    monkeypatch.setattr(
        machine, "_DETECTED", replace(here, cpu=machine.Cpu("EPYC", "AuthenticAMD", frozenset({"avx2"})))
    )
    config.train.max_steps = 3
    with pytest.raises(UserError, match="resolved precision: 'bf16' -> 'fp32'"):
        run(config, resume="latest")


def test_a_checkpoint_older_than_a_choice_resumes(tmp_path, tiny_qwen2):
    """resolved.yaml of an older lowtune lacks the choices added since (here the method and the LoRA variant)."""
    config = tiny_config(
        tiny_qwen2, write_jsonl(tmp_path / "m.jsonl", MEMORISE), tmp_path / "run", max_steps=2, save_steps=2
    )
    run(config)
    saved = tmp_path / "run" / "checkpoint-2" / "resolved.yaml"
    record = yaml.safe_load(saved.read_text(encoding="utf-8"))
    del record["choices"]["method"], record["choices"]["lora_variant"]
    saved.write_text(yaml.safe_dump(record, allow_unicode=True), encoding="utf-8")
    config.train.max_steps = 3
    output = run(config, resume="latest")
    assert json.loads((output / "run_summary.json").read_text())["steps"] == 3


def test_resuming_from_an_earlier_checkpoint_replaces_the_later_ones(tmp_path, tiny_qwen2, caplog):
    config = tiny_config(
        tiny_qwen2, write_jsonl(tmp_path / "m.jsonl", MEMORISE * 3), tmp_path / "run", max_steps=4, save_steps=2
    )
    config.train.save_total_limit = None
    output = run(config)
    first = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    (output / "checkpoint-4" / "mark").write_text("the first time", encoding="utf-8")
    caplog.set_level("WARNING", logger="lowtune.recipe")
    run(config, resume=str(output / "checkpoint-2"))
    assert "checkpoint-2: checkpoints of the steps after it (checkpoint-4) are replaced" in caplog.text
    assert [c.name for c in complete_checkpoints(output)] == ["checkpoint-2", "checkpoint-4"]
    assert not (output / "checkpoint-4" / "mark").exists() and not list(output.glob(".tmp-*"))
    again = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [[entry.get("loss") for entry in state["log_history"]] for state in (first, again)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and again["global_step"] == 4  # the same steps again


def test_raising_the_step_limit_trains_further(tmp_path, tiny_qwen2):
    config = tiny_config(
        tiny_qwen2, write_jsonl(tmp_path / "m.jsonl", MEMORISE), tmp_path / "run", max_steps=2, save_steps=2
    )
    run(config)
    config.train.max_steps = 4
    output = run(config, resume="latest")
    assert json.loads((output / "run_summary.json").read_text())["steps"] == 4


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, tiny_qwen2):
    config = tiny_config(tiny_qwen2, write_jsonl(tmp_path / "m.jsonl", MEMORISE), tmp_path / "run", max_steps=1)
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        run(config, resume="latest")


def test_a_nan_gradient_stops_the_run_before_the_update(tmp_path, tiny_qwen2, monkeypatch):
    """A weight turned NaN after the step-2 checkpoint: step 3's gradient is NaN and must never be applied."""
    from transformers import TrainerCallback

    from lowtune import recipe

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                next(p for p in model.parameters() if p.requires_grad).data[0, 0] = float("nan")

    build = recipe.build_trainer

    def build_poisoned(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(Poison())
        return trainer

    monkeypatch.setattr(recipe, "build_trainer", build_poisoned)
    config = tiny_config(
        tiny_qwen2, write_jsonl(tmp_path / "m.jsonl", MEMORISE), tmp_path / "run", max_steps=6, save_steps=2
    )
    with pytest.raises(RunStopped, match=r"gradient became nan at step 3.*last good checkpoint is .*checkpoint-2"):
        run(config)
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    assert all(torch.isfinite(t).all() for t in adapter(tmp_path / "run" / "checkpoint-2").values())


def test_overwrite_replaces_the_old_runs_checkpoints_logs_and_results(tmp_path, tiny_qwen2):
    config = tiny_config(
        tiny_qwen2, write_jsonl(tmp_path / "m.jsonl", MEMORISE), tmp_path / "run", max_steps=4, save_steps=2
    )
    output = run(config)
    (old_events,) = (output / "tensorboard").glob("events.out.tfevents.*")
    (output / "eval_results.json").write_text("{}")  # the old adapter's `lowtune eval`
    (output / "notes.txt").write_text("mine")  # not lowtune's: kept
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "samples.jsonl").write_text("outside the run folder")
    (output / "eval_samples.jsonl").symlink_to(elsewhere / "samples.jsonl")  # a link is removed, not followed
    config.train.max_steps, config.train.save_steps = 1, 0
    run(config, overwrite=True)
    assert complete_checkpoints(output) == []
    assert json.loads((output / "run_summary.json").read_text())["steps"] == 1
    events = list((output / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and not old_events.exists()  # only the new run's curves in TensorBoard
    assert not (output / "eval_results.json").exists() and not (output / "eval_samples.jsonl").is_symlink()
    assert (output / "notes.txt").read_text() == "mine"
    assert (elsewhere / "samples.jsonl").read_text() == "outside the run folder"


def test_staging_folders_are_not_checkpoints(tmp_path):
    (tmp_path / ".tmp-checkpoint-8").mkdir()
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-10").mkdir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert os.path.basename(complete_checkpoints(tmp_path)[-1]) == "checkpoint-10"
