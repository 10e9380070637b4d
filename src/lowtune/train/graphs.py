"""CUDA graphs: each micro-batch's forward and backward pass replayed from a capture, one capture per row length.

A small step is bound by the host: at ~1,200 tokens a pass of the 7B shape costs ~550 ms of Python and kernel launches
for ~130 ms of GPU work (bench/NOTES.md). Captured once, the same ~9,000 kernels replay with no host work. A graph
fixes every shape, so `PackedCollator` pads each row up to a multiple of `BUCKET` tokens and its boundaries to a fixed
record count; the loss runs over every position ("masked") so no shape depends on the labels; varlen attention builds
no mask, so nothing reads a value back to the host inside the pass. Dropout draws inside a graph advance with each
replay, and a checkpointed layer's recomputation redraws its forward's masks (measured equal to the uncheckpointed
graph on the H200; bench/probe_graphs.py).

The gradients come out of the graph with `torch.autograd.grad` (into the graph's own buffers) and are added to the
adapters' `.grad` after each replay, so accumulation, clipping and the optimizer stay Trainer's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

log = logging.getLogger(__name__)

BUCKET = 128  # tokens: rows are padded up to a multiple of this (more graphs when smaller, more padding when larger)
WARMUP_PASSES = 2  # eager passes on a side stream before a capture (lazy initialisations must not be captured)


class GraphedPasses:
    """Forward and backward passes of `model` over packed batches, one CUDA graph per batch shape."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: Sequence[torch.nn.Parameter],
        autocast: Callable[[], AbstractContextManager],
    ):
        self.model, self.params, self.autocast = model, list(params), autocast
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every capture: they never run at once
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Any], tuple]] = {}
        self.capture_seconds = 0.0

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        """Runs the pass on `batch` (tensors on the GPU, `num_items_in_batch` a tensor), adds the adapters'
        gradients into their `.grad`, and returns the loss (a fresh tensor)."""
        key = tuple((k, tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in sorted(batch.items()))
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch)
            log.info(
                "CUDA graph captured for rows of %d tokens (%d so far, %.1f s)",
                batch["input_ids"].shape[1],
                self.captured,
                self.capture_seconds,
            )
        graph, static, (loss, grads) = self._graphs[key]
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                static[name].copy_(value, non_blocking=True)
        graph.replay()
        self._accumulate(grads)
        return loss.clone()  # the graph's own buffer is overwritten by the next replay

    def _pass(self, batch: dict[str, Any]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        with self.autocast():
            loss = self.model(**batch).loss
        # detached: a live autograd graph would keep the adapters' gradient nodes, bound to the stream they ran on
        return loss.detach(), torch.autograd.grad(loss, self.params)

    def _capture(self, batch: dict[str, Any]) -> tuple[torch.cuda.CUDAGraph, dict[str, Any], tuple]:
        start = time.perf_counter()
        static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                self._pass(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self._pass(static)
        self.capture_seconds += time.perf_counter() - start
        return graph, static, outputs

    def _accumulate(self, grads: Sequence[torch.Tensor]) -> None:
        empty = [i for i, p in enumerate(self.params) if p.grad is None]
        if len(empty) == len(self.params):  # the step's first micro-batch (Trainer sets the gradients to None)
            for param, grad in zip(self.params, torch._foreach_mul(list(grads), 1.0), strict=True):
                param.grad = grad
            return
        for i in empty:
            self.params[i].grad = torch.zeros_like(self.params[i])
        torch._foreach_add_([p.grad for p in self.params], list(grads))
