"""The memory plan and the checkpointing policy: what offloading saves, and what auto picks on which machine."""

from __future__ import annotations

import logging
import types

import psutil
import pytest
import torch

from lowtune.bench.model import QWEN_7B_SHAPE
from lowtune.config import RunConfig
from lowtune.model.checkpointing import Checkpointing
from lowtune.train import memory
from lowtune.train.memory import GIB, plan_memory, plan_run, run_planner

QWEN_7B = QWEN_7B_SHAPE
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LENGTHS = [200] * 400  # records of 200 tokens: 81 of them to a batch of 16k
LAYER_INPUT = 16384 * 4096 * 2  # one decoder layer's input at 16k tokens, bf16


def plan(mode, layers=None):
    return plan_memory(QWEN_7B, "4bit", "bf16", True, 8, SEVEN, 16384, Checkpointing(mode, layers), 0.1, True)


def test_offload_keeps_two_layer_inputs_on_the_gpu_and_the_rest_on_the_host():
    on, offload, off = plan("on"), plan("offload"), plan("off")
    assert on.checkpoints == 32 * LAYER_INPUT and on.host == 0
    assert offload.checkpoints == 2 * LAYER_INPUT and offload.host == 32 * LAYER_INPUT
    assert on.total - offload.total == 30 * LAYER_INPUT  # 3.75 GiB at 16k tokens
    assert offload.activations == on.activations < off.activations
    rows = list(offload.table().columns[0].cells)
    assert "layer inputs in pinned host memory" in rows
    assert "on, all 32 of 32 layers, inputs on the host" in list(offload.table().columns[1].cells)


def test_checkpointing_some_layers_keeps_the_others_whole():
    layer = plan("off").activations - plan("on").activations  # 31 layers' activations
    layer /= 31
    for count in (1, 8, 31):
        some = plan("on", count)
        assert some.checkpoints == count * LAYER_INPUT
        # The last 32 - count layers keep their activations; the checkpointed ones are recomputed after those are freed.
        assert some.activations == pytest.approx(plan("on").activations + (31 - count) * layer)
    assert plan("on", 32).total == plan("on").total
    totals = [plan("offload", count).total for count in range(1, 33)]
    assert totals == sorted(totals, reverse=True)  # each layer checkpointed lowers the peak
    assert plan("offload", 8).host == 8 * LAYER_INPUT


def config_with(setting) -> RunConfig:
    config = RunConfig()
    config.model.quantization = "4bit"
    config.lora.target_modules = SEVEN
    config.train.tokens_per_batch = 16384
    config.train.gradient_checkpointing = setting
    return config


def choose(monkeypatch, setting, gpu_gib=80, host_available_gib=100, cuda=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (0, gpu_gib * GIB))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=host_available_gib * GIB))
    return plan_run(config_with(setting), QWEN_7B, LENGTHS, packed=True).checkpointing


def planned_peak(mode, layers):
    return run_planner(config_with("auto"), QWEN_7B, LENGTHS, True)(Checkpointing(mode, layers)).total


@pytest.mark.parametrize(("setting", "expected"), [(True, "on"), (False, "off"), ("offload", "offload")])
def test_a_setting_other_than_auto_is_taken_as_it_is(monkeypatch, setting, expected):
    assert choose(monkeypatch, setting) == Checkpointing(expected)  # every layer


def test_auto_on_a_gpu_checkpoints_the_fewest_layers_that_fit(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=memory.__name__)
    # 7B at 16k tokens needs ~86 GiB without checkpointing: nothing to save on a 1 TB GPU.
    assert choose(monkeypatch, "auto", gpu_gib=1000) == Checkpointing("off")
    for gpu_gib, host_gib, mode in ((80, 100, "offload"), (80, 6, "on"), (40, 100, "offload"), (10, 100, "offload")):
        chosen = choose(monkeypatch, "auto", gpu_gib=gpu_gib, host_available_gib=host_gib)
        assert chosen.mode == mode  # offload when half the host's free memory holds the layer inputs (4 GiB)
        budget, count = 0.9 * gpu_gib * GIB, chosen.checkpointed(32)
        assert planned_peak(mode, count) <= budget or count == 32
        assert planned_peak(mode, count - 1) > budget  # one layer fewer would not fit
    assert choose(monkeypatch, "auto", gpu_gib=80).layers < 32 / 2  # an 80 GB GPU recomputes a few layers, not all
    assert choose(monkeypatch, "auto", gpu_gib=10) == Checkpointing("offload")  # a small GPU needs every one
    assert "room in host memory 50.0 GiB" in caplog.messages[-1]


def test_on_the_cpu_auto_is_off_and_offload_says_it_saves_nothing(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=memory.__name__)
    assert choose(monkeypatch, "auto", cuda=False) == Checkpointing("off")
    assert choose(monkeypatch, "offload", cuda=False) == Checkpointing("offload")
    assert "copied within host memory (no gain)" in caplog.messages[-1]
