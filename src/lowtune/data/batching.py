"""Batches of similar-length records, in a random order that depends only on (seed, epoch).

torch and transformers offer random batches (much padding) or `LengthGroupedSampler`, which puts the longest
records first and sorts 50-batch blocks, so a short run sees only the longest records. This sampler shuffles,
sorts within small windows, then shuffles the batches: little padding, no bias, and a data order that a resumed
run reproduces exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

WINDOW_BATCHES = 16  # batches per sorted window: larger cuts more padding but makes batches less random


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Yields lists of record indices: `batch_size` records each, or as many as fit `tokens_per_batch`.

    Args:
        lengths: token count of each record.
        batch_size: records per batch (when `tokens_per_batch` is None).
        tokens_per_batch: token budget per batch; counted as padded rows (`longest x count`) unless `packed`.
        packed: the batch will be packed into one row, so the budget counts real tokens.
        seed: with the epoch, fixes the order.
        merge: run this many consecutive batches of the plan as one (the micro-batches of one optimizer step run
            together when they fit: the same records and the same gradient, fewer passes over the model).
        num_replicas: processes sharing each batch (distributed training): every process plans the same global
            batches and takes every num_replicas-th record of each, so the batch means the same for any count.
        rank: this process's place among them.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int = 8,
        tokens_per_batch: int | None = None,
        packed: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        merge: int = 1,
    ):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.tokens_per_batch = tokens_per_batch
        self.packed = packed
        self.seed = seed
        self.num_replicas, self.rank = num_replicas, rank
        self.merge = merge
        self.epoch = 0
        self._plans: dict[int, list[list[int]]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.plan(self.epoch):
            if len(batch) < self.num_replicas:
                raise ValueError(f"a batch of {len(batch)} records cannot be shared by {self.num_replicas} processes")
            yield batch[self.rank :: self.num_replicas]  # records sorted by length: each share is alike

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: self._make_plan(epoch)}
        return self._plans[epoch]

    def _make_plan(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = self._window_size()
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=self.lengths.__getitem__)
            batches += self._split(chunk)
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in shuffle]
        return [self._merged(batches[i : i + self.merge]) for i in range(0, len(batches), self.merge)]

    def _merged(self, batches: list[list[int]]) -> list[int]:
        """One batch of `batches`' records, sorted by length again (so each process's share stays alike)."""
        return batches[0] if len(batches) == 1 else sorted(sum(batches, []), key=self.lengths.__getitem__)

    def _window_size(self) -> int:
        if self.tokens_per_batch is None:
            return self.batch_size * WINDOW_BATCHES
        mean_length = max(1, sum(self.lengths) // max(1, len(self.lengths)))
        return max(1, self.tokens_per_batch // mean_length) * WINDOW_BATCHES

    def _split(self, ascending: list[int]) -> list[list[int]]:
        """Cuts indices sorted by length into batches; the newest index is always the longest so far."""
        if self.tokens_per_batch is None:
            return [ascending[i : i + self.batch_size] for i in range(0, len(ascending), self.batch_size)]
        batches: list[list[int]] = [[]]
        real_tokens = 0
        for index in ascending:
            length = self.lengths[index]
            count = len(batches[-1]) + 1
            cost = real_tokens + length if self.packed else length * count
            if count > 1 and cost > self.tokens_per_batch:
                batches.append([])
                real_tokens = 0
            batches[-1].append(index)  # a record longer than the budget still gets a batch of its own
            real_tokens += length
        return batches
