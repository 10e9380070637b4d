"""Gradient checkpointing of the decoder layers, with the layer inputs optionally held in pinned host memory.

With checkpointing, autograd keeps one tensor per decoder layer between the forward and the backward pass: the
layer's input (tokens x hidden, bf16), from which the layer is recomputed. For a 7B model at 16k tokens that is
32 x 16k x 4096 x 2 B = 4 GiB of GPU memory. `offload` keeps those inputs in pinned host memory instead:

- forward: once the compute stream has queued layer i's input, a side stream copies it to the host while layer i
  computes; the input's GPU block is let go at layer i+1's input, once the compute stream has waited for the copy
  (an event, not `record_stream`: during a CUDA graph capture the allocator would not reuse a block that another
  stream used until the capture ends, and the offload would save no GPU memory there).
- backward: when layer i's recomputation asks for its input, the side stream starts bringing back layer i-1's, so
  that it is on the GPU before layer i's backward ends; the compute stream waits on an event for each input.
So at most two layer inputs are on the GPU at any time (see `train/memory.py`). The host copies live in pinned
buffers that the offloader allocates once and reuses from each pass to the next, so a CUDA graph can capture the
copies (a capture cannot allocate pinned memory) and replay them into the same buffers.

Non-reentrant `torch.utils.checkpoint` saves a layer's inputs through the saved-tensor hooks in force around the
call (what the layer saves inside goes through the checkpoint's own, innermost hooks), so hooks around each
checkpointed call see exactly the layer inputs. Written here rather than taken from torch because
`torch.autograd.graph.save_on_cpu` (which transformers' own `offload=True` uses) copies on the compute stream, waits
on the host for every copy and prefetches nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.autograd.graph import saved_tensors_hooks
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from lowtune import internals


@dataclass(frozen=True)
class Checkpointing:
    """Which decoder layers recompute their activations in the backward pass, and where their inputs wait.

    `layers` counts from the first layer: the last ones keep their activations, and the backward pass, which meets
    them first, frees those before it recomputes any layer. So a run that nearly fits recomputes only what it must.
    """

    mode: Literal["off", "on", "offload"]  # "on": the inputs stay on the GPU; "offload": in pinned host memory
    layers: int | None = None  # None: every decoder layer

    def checkpointed(self, total: int) -> int:
        """How many of `total` decoder layers are checkpointed."""
        return 0 if self.mode == "off" else total if self.layers is None else min(self.layers, total)

    def describe(self, total: int | None) -> str:
        """E.g. "on, 9 of 32 layers, inputs on the host"; `total` None: the number of layers is not known."""
        if self.mode == "off":
            return "off"
        where = "inputs kept" if self.mode == "on" else "inputs on the host"
        if total is None:
            which = "every layer" if self.layers is None else f"the first {self.layers} layers"
            return f"on, {which}, {where}"
        count = self.checkpointed(total)
        return f"on, {'all ' if count == total else ''}{count} of {total} layers, {where}"


def enable_checkpointing(model: PreTrainedModel, checkpointing: Checkpointing) -> ActivationOffloader | None:
    """Checkpoints the first `checkpointing.layers` decoder layers of `model` (non-reentrant); with "offload", their
    inputs wait on the host.

    Returns the offloader, which counts what it moved, or None when nothing is offloaded.
    """
    if checkpointing.mode == "off":
        return None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Checkpointed blocks need an input that requires grad, or no gradient reaches the adapters.
    model.enable_input_require_grads()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    count = checkpointing.checkpointed(len(layers))
    for layer in layers[count:]:
        layer.gradient_checkpointing = False
    if checkpointing.mode == "on":
        return None
    offloader = ActivationOffloader(next(model.parameters()).device)
    for layer in layers[:count]:
        internals.wrap_checkpoint_call(layer, offloader.checkpoint)
    return offloader


HOST_CHUNK_BYTES = 256 * 2**20  # pinned host memory is allocated in chunks of this size (or one tensor's, if larger)
HOST_ALIGNMENT = 512  # bytes: every host copy starts on this boundary


class _HostCopy:
    """One offloaded tensor: its host copy, the copy of the tensor saved just before it, and its way back."""

    __slots__ = ("host", "previous", "on_device", "ready", "__weakref__")

    def __init__(self, host: torch.Tensor, previous: weakref.ref[_HostCopy] | None):
        self.host = host
        self.previous = previous  # weak: a copy lives as long as autograd keeps it, no longer
        self.on_device: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None


class HostBuffers:
    """Host memory (pinned for CUDA) for one pass's copies, reused by the next once no copy of this one is alive.

    Chunks are allocated when a pass needs more than there is, and never freed: a captured CUDA graph keeps writing
    into the addresses it captured. Passes reuse them from the start, so the host holds the largest pass's copies.
    """

    def __init__(self, pinned: bool):
        self.pinned = pinned  # on the CPU, plain memory: the same bookkeeping, nothing saved
        self.chunks: list[torch.Tensor] = []
        self.alive = 0  # copies of the current pass that autograd still holds
        self._chunk, self._offset = 0, 0

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A pinned host tensor for one copy; it is the pass's until every copy taken in the pass has died."""
        if self.alive == 0:
            self._chunk, self._offset = 0, 0  # a new pass
        size = torch.Size(shape).numel() * dtype.itemsize
        while self._chunk < len(self.chunks) and self._offset + size > self.chunks[self._chunk].numel():
            self._chunk, self._offset = self._chunk + 1, 0
        if self._chunk == len(self.chunks):
            if self.pinned and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "a CUDA graph capture needs more pinned host memory than the passes before it allocated"
                )
            self.chunks.append(torch.empty(max(size, HOST_CHUNK_BYTES), dtype=torch.uint8, pin_memory=self.pinned))
        host = self.chunks[self._chunk][self._offset : self._offset + size].view(dtype).view(shape)
        self._offset += -(-size // HOST_ALIGNMENT) * HOST_ALIGNMENT
        self.alive += 1
        return host

    def release(self) -> None:
        """A copy died."""
        self.alive -= 1


class ActivationOffloader:
    """Saved-tensor hooks that keep the tensors saved on `device` in host memory until the backward pass.

    On CUDA the host memory is pinned and the copies run on a side stream (see the module's docstring). On the CPU
    the "host copy" is a plain copy within host memory: it saves nothing there, and exists so that the CPU runs the
    same bookkeeping (order, prefetch, hand-over) as the GPU.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host = HostBuffers(pinned=device.type == "cuda")
        self.offloaded = 0  # tensors moved so far
        self.fetched = 0  # tensors brought back so far
        self._last: weakref.ref[_HostCopy] | None = None
        # The input whose copy to the host may still run, and the copy's end: its block is let go at the next input.
        self._copying: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def checkpoint(self, checkpoint: Callable[..., Any], function: Callable[..., Any], *args: Any, **kwargs: Any):
        """`checkpoint(function, *args, **kwargs)`, with the inputs it saves for the recomputation offloaded."""
        with saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, **kwargs)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _HostCopy:
        if tensor.device != self.device or tensor.numel() == 0:
            return tensor  # the checkpoint's own empty marker, or anything not on the training device
        self._let_go()
        host = self.host.take(tensor.shape, tensor.dtype)
        if self.stream is None:
            host.copy_(tensor.detach())
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is written there
            with torch.cuda.stream(self.stream):
                host.copy_(tensor.detach(), non_blocking=True)
                self._copying = (tensor, self.stream.record_event())
        copy = _HostCopy(host, self._last)
        weakref.finalize(copy, self.host.release)
        self._last = weakref.ref(copy)
        self.offloaded += 1
        return copy

    def _let_go(self) -> None:
        """Lets the allocator reuse the last offloaded input's GPU block, for work queued after its copy."""
        if self._copying is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copying[1])
            self._copying = None

    def _unpack(self, saved: torch.Tensor | _HostCopy) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        self._let_go()  # the forward's last input: the backward has begun
        self._fetch(saved)
        previous = saved.previous() if saved.previous is not None else None
        if previous is not None:
            self._fetch(previous)  # the layer before is recomputed next: its input travels while this one runs
        if saved.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(saved.ready)
        tensor, saved.on_device = saved.on_device, None  # handed over: freed once autograd is done with it
        return tensor

    def _fetch(self, copy: _HostCopy) -> None:
        """Starts bringing `copy` back to the device (once)."""
        if copy.on_device is not None:
            return
        self.fetched += 1
        if self.stream is None:
            copy.on_device = copy.host
            return
        compute = torch.cuda.current_stream(self.device)
        copy.on_device = torch.empty_like(copy.host, device=self.device)  # a block of the compute stream...
        self.stream.wait_stream(compute)  # ...which the side stream may write only after its last use there
        with torch.cuda.stream(self.stream):
            copy.on_device.copy_(copy.host, non_blocking=True)
            copy.ready = self.stream.record_event()
