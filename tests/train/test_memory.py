"""The memory plan and the checkpointing policy: what offloading saves, and what auto picks on which machine."""

from __future__ import annotations

import logging
import types

import psutil
import pytest
import torch

from lowtune.bench.model import QWEN_7B_SHAPE
from lowtune.config import RunConfig
from lowtune.train import memory
from lowtune.train.memory import GIB, choose_checkpointing, plan_memory

QWEN_7B = QWEN_7B_SHAPE
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYER_INPUT = 16384 * 4096 * 2  # one decoder layer's input at 16k tokens, bf16


def plan(checkpointing):
    return plan_memory(QWEN_7B, "4bit", "bf16", True, 8, SEVEN, 16384, checkpointing, 0.1, True)


def test_offload_keeps_two_layer_inputs_on_the_gpu_and_the_rest_on_the_host():
    on, offload, off = plan("on"), plan("offload"), plan("off")
    assert on.checkpoints == 32 * LAYER_INPUT and on.host == 0
    assert offload.checkpoints == 2 * LAYER_INPUT and offload.host == 32 * LAYER_INPUT
    assert on.total - offload.total == 30 * LAYER_INPUT  # 3.75 GiB at 16k tokens
    assert offload.activations == on.activations < off.activations
    rows = list(offload.table().columns[0].cells)
    assert "layer inputs in pinned host memory" in rows


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
    return choose_checkpointing(config_with(setting), QWEN_7B, [200] * 400, packed=True)


@pytest.mark.parametrize(("setting", "expected"), [(True, "on"), (False, "off"), ("offload", "offload")])
def test_a_setting_other_than_auto_is_taken_as_it_is(monkeypatch, setting, expected):
    assert choose(monkeypatch, setting) == expected


def test_auto_on_a_gpu(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=memory.__name__)
    # 7B at 16k tokens needs ~100 GiB without checkpointing: too much for 80 GiB, nothing to save on a 1 TB GPU.
    assert choose(monkeypatch, "auto", gpu_gib=1000) == "off"
    assert choose(monkeypatch, "auto") == "offload"  # 4 GiB of layer inputs, 50 GiB of room on the host
    assert choose(monkeypatch, "auto", host_available_gib=6) == "on"  # 3 GiB of room: they stay on the GPU
    assert "room in host memory 3.0 GiB" in caplog.messages[-1]


def test_on_the_cpu_auto_is_off_and_offload_says_it_saves_nothing(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=memory.__name__)
    assert choose(monkeypatch, "auto", cuda=False) == "off"
    assert choose(monkeypatch, "offload", cuda=False) == "offload"
    assert "copied within host memory (no gain)" in caplog.messages[-1]
