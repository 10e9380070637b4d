"""CUDA graphs: each micro-batch's forward and backward pass replayed from a capture, one capture per row length.

A small step is bound by the host: at ~1,200 tokens a pass of the 7B shape costs ~550 ms of Python and kernel launches
for ~130 ms of GPU work (bench/NOTES.md). Captured once, the same ~9,000 kernels replay with no host work. A graph
fixes every shape, so `PackedCollator` pads each row up to a multiple of `BUCKET` tokens and its boundaries to a fixed
record count; the loss runs over every position ("masked") so no shape depends on the labels; varlen attention builds
no mask, so nothing reads a value back to the host inside the pass. Dropout draws inside a graph advance with each
replay, and a checkpointed layer's recomputation redraws its forward's masks (measured equal to the uncheckpointed
graph on the H200; bench/probe_graphs.py).

The gradients come out of the pass with `torch.autograd.grad` and are added, inside the graph, into buffers that
are the adapters' `.grad`, so accumulation across micro-batches, clipping and the optimizer stay Trainer's. What a
pass computes is the trainer's (`PassOutputs`): its loss, and any figures it adds up for the log (a preference pass's
rewards), all of them outputs of the graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

log = logging.getLogger(__name__)
PassOutputs = Callable[[dict[str, Any]], dict[str, torch.Tensor]]  # a batch -> {"loss": ..., and figures to log}

BUCKET = 128  # tokens: rows are padded up to a multiple of this (more graphs when smaller, more padding when larger)
WARMUP_PASSES = 2  # eager passes on a side stream before a capture (lazy initialisations must not be captured)


class GraphedPasses:
    """Forward and backward passes over packed batches, one CUDA graph per batch shape: `outputs` computes a batch's
    loss (and what else the trainer logs) from the model, and the gradients of `params` follow from the loss."""

    def __init__(
        self,
        outputs: PassOutputs,
        params: Sequence[torch.nn.Parameter],
        autocast: Callable[[], AbstractContextManager],
    ):
        self.outputs, self.params, self.autocast = outputs, list(params), autocast
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every capture: they never run at once
        self.warmup_stream = torch.cuda.Stream()  # one: each new stream would hold its own cuBLAS workspace
        # Every graph adds its gradients into these, the adapters' `.grad` (not into buffers of its own: a graph's
        # outputs outlive it, so per-graph gradients would cost the adapters' size once per row shape).
        self.gradients = [torch.zeros_like(p) for p in self.params]
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Any], dict[str, torch.Tensor]]] = {}
        self.capture_seconds = 0.0

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Runs the pass on `batch` (tensors on the GPU, `num_items_in_batch` a tensor), adds the adapters'
        gradients into their `.grad`, and returns the pass's outputs (fresh tensors)."""
        graph, static, outputs = self._graphs.get(shape_key(batch)) or self.capture(batch)
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                static[name].copy_(value, non_blocking=True)
        self._bind_gradients()
        graph.replay()
        return {name: value.clone() for name, value in outputs.items()}  # the next replay overwrites the graph's own

    def capture(self, batch: dict[str, Any]) -> tuple[torch.cuda.CUDAGraph, dict[str, Any], dict[str, torch.Tensor]]:
        """The graph of `batch`'s shape, captured now unless it was before."""
        key = shape_key(batch)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch)
            log.info(
                "CUDA graph captured for rows of %d tokens (%d so far, %.1f s; %.2f GiB allocated)",
                batch["input_ids"].shape[1],
                self.captured,
                self.capture_seconds,
                torch.cuda.memory_allocated() / 2**30,
            )
        return self._graphs[key]

    def _pass(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        with self.autocast():
            outputs = self.outputs(batch)
        gradients = torch.autograd.grad(outputs["loss"], self.params)
        # detached: a live autograd graph would keep the adapters' gradient nodes, bound to the stream they ran on
        return {name: value.detach() for name, value in outputs.items()}, gradients

    def _capture(self, batch: dict[str, Any]) -> tuple[torch.cuda.CUDAGraph, dict[str, Any], dict[str, torch.Tensor]]:
        start = time.perf_counter()
        static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.warmup_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.warmup_stream):
            for _ in range(WARMUP_PASSES):
                self._pass(static)  # not accumulated: only the replays train
        torch.cuda.current_stream().wait_stream(self.warmup_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs, gradients = self._pass(static)
            torch._foreach_add_(self.gradients, list(gradients))
        torch.cuda.empty_cache()  # the warm-up passes' blocks, cached for their stream, would stay reserved
        self.capture_seconds += time.perf_counter() - start
        return graph, static, outputs

    def _bind_gradients(self) -> None:
        """Makes the adapters' `.grad` the graphs' accumulators, zeroed at a step's first micro-batch (Trainer sets
        the gradients to None after each optimizer step)."""
        current = [p.grad for p in self.params]
        if all(grad is mine for grad, mine in zip(current, self.gradients, strict=True)):
            return
        if any(grad is not None for grad in current):
            raise RuntimeError(
                "the adapters' gradients were replaced outside the CUDA graphs' accumulators; set "
                "train.cuda_graphs: false if something else must write them"
            )
        torch._foreach_zero_(self.gradients)
        for param, grad in zip(self.params, self.gradients, strict=True):
            param.grad = grad


def shape_key(batch: dict[str, Any]) -> tuple:
    """What a graph fixes of a batch: each tensor's shape, and every other value."""
    return tuple((k, tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in sorted(batch.items()))
