"""torchrun with two CPU processes (gloo) trains what one process trains with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MEMORISE, tiny_config, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train(tmp_path: Path, model: Path, name: str, processes: int) -> Path:
    data = write_jsonl(
        tmp_path / "m.jsonl", [dict(r, output=r["output"] * (i + 1)) for i, r in enumerate(MEMORISE * 4)]
    )
    config = tiny_config(model, data, tmp_path / name, max_steps=4, learning_rate=1e-2)
    config.train.gradient_accumulation = 2
    path = tmp_path / f"{name}.yaml"
    path.write_text(config.to_yaml(), encoding="utf-8")
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    command = [sys.executable] + (launcher if processes > 1 else []) + ["-m", "lowtune", "train", str(path)]
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / name


def losses(folder: Path) -> list[float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, tiny_qwen2):
    single = train(tmp_path, tiny_qwen2, "single", processes=1)
    double = train(tmp_path, tiny_qwen2, "double", processes=2)
    assert len(losses(single)) == 4
    assert losses(double) == pytest.approx(losses(single), rel=1e-5)
    assert (double / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in double.glob("**/adapter_model.safetensors")) == ["adapter_model.safetensors"]
