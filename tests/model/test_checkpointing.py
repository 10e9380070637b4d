"""Offloaded checkpointing computes exactly what plain checkpointing computes, and brings inputs back in order."""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM

from lowtune.config import LoraSettings
from lowtune.model.checkpointing import (
    HOST_ALIGNMENT,
    HOST_CHUNK_BYTES,
    ActivationOffloader,
    Checkpointing,
    HostBuffers,
    enable_checkpointing,
)
from lowtune.model.lora import attach_lora

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# On CUDA the copies are pinned and run on a side stream: on the GPU machine, run this file with
# LOWTUNE_TEST_DEVICE=cuda to check that path.
DEVICE = os.environ.get("LOWTUNE_TEST_DEVICE", "cpu")


def loss_and_lora_grads(folder, checkpointing, device):
    """One forward and backward of a tiny Qwen2 with LoRA (dropout on, B not zero, so every gradient is non-zero)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": device})
    torch.manual_seed(0)  # the same A matrices
    model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.1), SEVEN, checkpointing)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_()
    model.train()
    input_ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(2)  # the same dropout masks in every run (checkpointing replays them in the recomputation)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, model


def test_offload_gives_the_loss_and_lora_gradients_of_plain_checkpointing(tiny_qwen2):
    loss_on, grads_on, _ = loss_and_lora_grads(tiny_qwen2, Checkpointing("on"), DEVICE)
    loss_offload, grads_offload, model = loss_and_lora_grads(tiny_qwen2, Checkpointing("offload"), DEVICE)
    # GPU kernels (attention's backward) may sum in another order from run to run.
    same = torch.equal if DEVICE == "cpu" else partial(torch.allclose, rtol=1e-4, atol=1e-6)
    assert same(loss_offload, loss_on)
    assert grads_offload.keys() == grads_on.keys() and len(grads_on) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name, grad in grads_on.items():
        assert grad.abs().sum() > 0, name
        assert same(grads_offload[name], grad), name
    # The hooks saw exactly one tensor per layer (its input) and brought each back once.
    offloader = model.get_base_model().model.layers[0]._gradient_checkpointing_func.func.__self__
    assert (offloader.offloaded, offloader.fetched) == (2, 2)
    # Once the backward is done no host copy is held, and the next pass reuses the same host memory.
    assert offloader.host.alive == 0
    chunks = [chunk.data_ptr() for chunk in offloader.host.chunks]
    model(input_ids=torch.zeros(2, 24, dtype=torch.long, device=DEVICE), labels=None).logits.sum().backward()
    assert offloader.host.alive == 0 and [chunk.data_ptr() for chunk in offloader.host.chunks] == chunks


def test_each_recomputation_finds_the_input_of_the_layer_before_on_its_way():
    offloader = ActivationOffloader(torch.device("cpu"))
    fetched_when_run = []

    def layer(x):
        fetched_when_run.append(offloader.fetched)
        return torch.sin(x) * 2

    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    hidden = x
    for _ in range(3):
        hidden = offloader.checkpoint(partial(checkpoint, use_reentrant=False), layer, hidden)
    hidden.sum().backward()
    # Three forwards, then the recomputations from the last layer: each finds its input and the one before fetched.
    assert fetched_when_run == [0, 0, 0, 2, 3, 3]
    expected = torch.autograd.grad(torch.sin(torch.sin(torch.sin(x) * 2) * 2).mul(2).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize(
    ("checkpointing", "checkpointed", "offloaded"),
    [("off", [False, False], None), ("on", [True, True], None), ("offload", [True, True], 2)],
)
def test_enable_checkpointing_modes(tiny_qwen2, checkpointing, checkpointed, offloaded):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    offloader = enable_checkpointing(model, Checkpointing(checkpointing))
    assert [layer.gradient_checkpointing for layer in model.model.layers] == checkpointed
    assert (offloader is not None) == (offloaded is not None)


def test_checkpointing_the_first_layer_only_gives_the_same_loss_and_gradients(tiny_qwen2):
    loss_all, grads_all, _ = loss_and_lora_grads(tiny_qwen2, Checkpointing("offload"), "cpu")
    loss_first, grads_first, model = loss_and_lora_grads(tiny_qwen2, Checkpointing("offload", 1), "cpu")
    layers = model.get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]  # the last layer is kept whole
    assert torch.equal(loss_first, loss_all)
    for name, grad in grads_all.items():
        assert torch.equal(grads_first[name], grad), name
    offloader = layers[0]._gradient_checkpointing_func.func.__self__
    assert (offloader.offloaded, offloader.fetched) == (1, 1)  # only the checkpointed layer's input


def test_host_buffers_are_reused_by_the_next_pass_and_grow_only_when_a_pass_needs_more():
    buffers = HostBuffers(pinned=False)
    first = [buffers.take(torch.Size([3, 5]), torch.bfloat16) for _ in range(3)]
    assert [t.data_ptr() - first[0].data_ptr() for t in first] == [0, HOST_ALIGNMENT, 2 * HOST_ALIGNMENT]
    assert len(buffers.chunks) == 1 and buffers.alive == 3
    for _ in first:
        buffers.release()
    again = buffers.take(torch.Size([3, 5]), torch.bfloat16)  # a new pass starts at the beginning
    assert again.data_ptr() == first[0].data_ptr() and again.shape == (3, 5) and again.dtype == torch.bfloat16
    big = buffers.take(torch.Size([HOST_CHUNK_BYTES]), torch.uint8)  # does not fit beside it: a chunk of its own
    assert len(buffers.chunks) == 2 and big.data_ptr() == buffers.chunks[1].data_ptr()
