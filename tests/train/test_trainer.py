"""The Trainer as lowtune builds it: micro-batches merged into one give the run that accumulating them gives."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowtune.recipe import run
from tests.conftest import MEMORISE, tiny_config, write_jsonl


def trained(tiny_qwen2, data, output, merge):
    config = tiny_config(
        tiny_qwen2, data, output, max_steps=4, batch_size=2, gradient_accumulation=3, merge_micro_batches=merge
    )
    config.train.packing = True
    config.model.device_map = "cpu"
    folder = run(config)
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    resolved = (folder / "resolved.yaml").read_text()
    return steps, load_file(folder / "adapter_model.safetensors"), resolved


def test_merged_micro_batches_give_the_same_losses_gradients_and_adapter(tmp_path, tiny_qwen2):
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE * 3)
    accumulated, accumulated_weights, accumulated_choices = trained(tiny_qwen2, data, tmp_path / "acc", False)
    merged, merged_weights, merged_choices = trained(tiny_qwen2, data, tmp_path / "merged", True)
    assert "merged: 1" in accumulated_choices and "merged: 3" in merged_choices
    assert len(merged) == len(accumulated) == 4
    for one, other in zip(merged, accumulated, strict=True):
        assert one["loss"] == pytest.approx(other["loss"], rel=1e-5)
        assert one["grad_norm"] == pytest.approx(other["grad_norm"], rel=1e-4)  # the step's whole gradient
    for name, weight in accumulated_weights.items():
        # Adam divides by sqrt(v): float-rounding differences grow where v is small, but stay far below lr (5e-3).
        torch.testing.assert_close(merged_weights[name], weight, rtol=1e-3, atol=1e-4)
    assert any((weight != 0).any() for name, weight in merged_weights.items() if "lora_B" in name)  # it trained
