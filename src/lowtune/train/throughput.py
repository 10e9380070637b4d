"""What a run trained per second, its peak memory, and the share of the GPU's bf16 matrix rate it used.

Counted on the host, from the rows the collator receives, so no step waits for the device to report a number: the
real (non-padding) tokens, the positions the loss projects through the output layer, and the (query, key) pairs
causal attention multiplies. The steps are timed from the end of the first optimizer step (which holds the warm-up:
kernel compilation, allocator growth, cuBLAS heuristics) to the end of the last, without the evaluations and
checkpoint saves between them; the first step is timed apart. The device is synchronised only where a clock reading
must cover the work queued before it: at the end of the first step, before an evaluation or a save, and at the end
of the last step.

With several processes, each counts and times its own share of every batch (the shares are alike, see the batch
sampler), so the figures are those of the process that reports them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from lowtune.data.pack import Row
from lowtune.data.templates import IGNORE_INDEX
from lowtune.model import arch
from lowtune.model.arch import Shape
from lowtune.train.memory import linear_weights, peak_memory_gib

MATMUL_SIZE = 8192  # large enough to run at the GPU's full matrix rate
MATMUL_SECONDS = 0.3
CALIBRATION_PRODUCTS = 10  # timed once after a first untimed product: the warm-up, and how long one product takes


@dataclass(frozen=True)
class Tokens:
    """What a set of records costs the model, counted from their rows."""

    real: int = 0  # the records' tokens (no padding)
    targets: int = 0  # positions whose next token is a label: the loss projects these through the output layer
    pairs: int = 0  # (query, key) pairs causal attention multiplies: L (L + 1) / 2 for a record of L tokens

    @classmethod
    def of(cls, rows: Sequence[Row]) -> Tokens:
        lengths = [len(row["input_ids"]) for row in rows]
        # Position t predicts label t + 1 (the collators drop the first label of each record, see data/pack.py).
        targets = sum(label != IGNORE_INDEX for row in rows for label in row["labels"][1:])
        return cls(sum(lengths), targets, sum(n * (n + 1) // 2 for n in lengths))

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.real + other.real, self.targets + other.targets, self.pairs + other.pairs)


@dataclass(frozen=True)
class Span:
    """Tokens trained and the seconds the training steps took."""

    tokens: Tokens = Tokens()
    seconds: float = 0.0

    def __add__(self, other: Span) -> Span:
        return Span(self.tokens + other.tokens, self.seconds + other.seconds)


def model_flops(shape: Shape, tokens: Tokens, lora_rank: int, lora_targets: Collection[str]) -> float:
    """Model FLOPs of one forward and one backward pass over `tokens`, the base frozen and LoRA on `lora_targets`.

    Counted, at 2 FLOPs a multiply-add:
    - the decoder's frozen linear layers: 2 x their weights per token forward, as many backward (the gradient of
      their input; frozen weights get none);
    - the output layer: 2 x vocab x hidden forward and as many backward, at each position the loss projects (the
      labelled ones);
    - causal attention's two products (scores, weighted values): 2 x 2 x q_width per (query, key) pair forward, twice
      that backward (four products), in every layer. Causal: a record of L tokens has L (L + 1) / 2 pairs, half the
      L x L that the PaLM formula (12 x layers x width x L per token, forward and backward) counts;
    - the adapters: A and B forward, the gradients of their inputs and weights backward, 6 x rank x (in + out) a token.
    Not counted, by the model FLOPs utilisation convention: the forward passes that gradient checkpointing recomputes,
    the output layer's work at unlabelled positions where a loss kernel projects every position, and the
    element-wise work (norms, rotary, softmax, SwiGLU).
    """
    adapted = sum(i + o for name, (i, o) in shape.projections().items() if name in lora_targets)
    per_token = 4 * linear_weights(shape) + 6 * lora_rank * adapted * shape.layers
    head = 4 * shape.vocab * shape.hidden * tokens.targets
    attention = 12 * shape.q_width * shape.layers * tokens.pairs
    return per_token * tokens.real + head + attention


def measured_bf16_rate(device: torch.device, size: int = MATMUL_SIZE, seconds: float = MATMUL_SECONDS) -> float:
    """This GPU's bf16 matrix rate in TFLOP/s: (size x size) @ (size x size) products for about `seconds` after a
    warm-up, timed with CUDA events.

    Measured rather than looked up, so no table of GPU names is needed and a GPU held back by its clocks or power
    limit is compared with what it does, not with its datasheet.
    """
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    torch.matmul(a, b, out=out)  # untimed: cuBLAS picks its kernel and allocates its workspace
    per_product = _seconds_of_products(a, b, out, CALIBRATION_PRODUCTS) / CALIBRATION_PRODUCTS
    count = max(1, round(seconds / per_product))
    return 2 * size**3 * count / _seconds_of_products(a, b, out, count) / 1e12


def _seconds_of_products(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, count: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(count):
        torch.matmul(a, b, out=out)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


@dataclass(frozen=True)
class Throughput:
    """A run's throughput figures (see the module docstring); `timed` excludes the first step."""

    first_step: Span | None  # None when no step ran
    timed: Span
    peak_memory_gib: float
    memory_device: str  # "cuda:N" or "cpu"
    model_flops_per_token: float | None  # of the timed steps; None without a model shape or timed steps
    bf16_rate_tflops: float | None  # measured; None on the CPU
    processes: int

    @property
    def tokens_per_second(self) -> float | None:
        return self.timed.tokens.real / self.timed.seconds if self.timed.seconds else None

    @property
    def bf16_share(self) -> float | None:
        if self.tokens_per_second is None or self.model_flops_per_token is None or self.bf16_rate_tflops is None:
            return None
        return self.model_flops_per_token * self.tokens_per_second / (self.bf16_rate_tflops * 1e12)

    def summary(self) -> dict[str, Any]:
        """The figures for run_summary.json."""
        return {
            "tokens": self.timed.tokens.real,
            "seconds": round(self.timed.seconds, 3),
            "first_step_tokens": self.first_step.tokens.real if self.first_step else None,
            "first_step_seconds": round(self.first_step.seconds, 3) if self.first_step else None,
            "tokens_per_second": _rounded(self.tokens_per_second, 1),
            "peak_memory_gib": round(self.peak_memory_gib, 3),
            "memory_device": self.memory_device,
            "model_flops_per_token": _rounded(self.model_flops_per_token, 0),
            "bf16_rate_tflops": _rounded(self.bf16_rate_tflops, 1),
            "bf16_share": _rounded(self.bf16_share, 4),
            "processes": self.processes,
        }

    def describe(self) -> str:
        """The line printed at the end of training."""
        process = f" on process 0 of {self.processes}" if self.processes > 1 else ""
        if self.memory_device == "cpu":
            memory = f"peak resident memory {self.peak_memory_gib:.2f} GiB (CPU)"
        else:
            memory = f"peak GPU memory {self.peak_memory_gib:.2f} GiB"
        return f"{self._rate()}{process}, {memory}, {self._share()}"

    def _rate(self) -> str:
        if self.first_step is None:
            return "no training step ran: no throughput"
        first = self.first_step
        if self.tokens_per_second is None:
            return (
                f"trained one step only ({first.tokens.real:,} real tokens in {first.seconds:.1f} s, with warm-up): "
                "no rate after it"
            )
        return (
            f"trained {self.timed.tokens.real:,} real tokens in {self.timed.seconds:.1f} s: "
            f"{self.tokens_per_second:,.0f} tokens/s (after a first step of {first.seconds:.1f} s with warm-up)"
        )

    def _share(self) -> str:
        if self.bf16_share is not None:
            return (
                f"{self.bf16_share:.0%} of this GPU's bf16 matrix rate ({self.bf16_rate_tflops:,.0f} TFLOP/s measured)"
            )
        if self.bf16_rate_tflops is None:
            return "no share of a bf16 matrix rate (a GPU figure; this run trained on the CPU)"
        if self.model_flops_per_token is None and self.tokens_per_second is not None:
            return "no share of the bf16 matrix rate (no model shape for this family to count its FLOPs)"
        return "no share of the bf16 matrix rate (no step timed after the first)"


def _rounded(value: float | None, digits: int) -> float | int | None:
    if value is None:
        return None
    return round(value) if digits == 0 else round(value, digits)


class ThroughputMeter(TrainerCallback):
    """Counts the tokens of the micro-batches trained and times the optimizer steps, without evaluations and saves.

    Its `collate` stands in for the trainer's collator and notes what each batch it collates holds. The trainer
    collates ahead of training (accelerate's loader runs one batch ahead; Trainer fetches a step's micro-batches
    before running them), so the notes wait in a queue that each step's end takes its micro-batches from, in order.
    The evaluation collates through the same collator: it runs between a step's end (or the start of training, or an
    epoch's end) and `on_evaluate`, when no training batch is collated, so what was collated in that interval is
    dropped then.
    An evaluation's or save's time runs from the step's end (the step's log line falls in it) to its
    `on_evaluate` / `on_save`.
    """

    def __init__(self, collator: Callable[[Sequence[Row]], Any], clock: Callable[[], float] = time.perf_counter):
        self.collator = collator
        self.clock = clock
        self.device: torch.device | None = None
        self.processes = 1
        self.first_step: Span | None = None
        self.timed = Span()
        self._collated: deque[Tokens] = deque()
        self._trained_before_evaluation = 0  # queue entries that are training batches, when an evaluation begins
        self._micro_batches = 0  # of the step in progress
        self._since = 0.0  # when the step in progress began (the end of the last step, evaluation or save)
        self._synchronize: Callable[[], None] = _nothing

    def collate(self, rows: Sequence[Row]) -> Any:
        self._collated.append(Tokens.of(rows))
        return self.collator(rows)

    def on_train_begin(self, args, state, control, **kwargs):
        if args.dataloader_num_workers:
            raise RuntimeError("the throughput meter counts batches as they are collated: it needs no loader workers")
        self.device, self.processes = args.device, args.world_size
        self._synchronize = torch.cuda.synchronize if args.device.type == "cuda" else _nothing
        self._boundary()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._collated.clear()  # a batch the last epoch's loader collated ahead was never trained
        self._trained_before_evaluation = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_batches += 1

    def on_step_end(self, args, state, control, **kwargs):
        trained = Tokens()
        for _ in range(self._micro_batches + 1):
            trained += self._collated.popleft()
        self._micro_batches = 0
        pause_follows = control.should_evaluate or control.should_save or control.should_training_stop
        if self.first_step is None or pause_follows:
            # The clock must cover the work queued so far: at the first and last steps and before an evaluation or
            # a save, never at every step.
            self._synchronize()
        step = Span(trained, self.clock() - self._since)
        if self.first_step is None:
            self.first_step = step
        else:
            self.timed += step
        self._boundary()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._trained_before_evaluation = len(self._collated)  # an evaluation may follow

    def on_evaluate(self, args, state, control, **kwargs):
        while len(self._collated) > self._trained_before_evaluation:
            self._collated.pop()
        self._since = self.clock()

    def on_save(self, args, state, control, **kwargs):
        self._since = self.clock()

    def figures(self, shape: Shape | None, lora_rank: int, lora_targets: list[str] | str) -> Throughput:
        """The run's figures once training has ended; on a GPU this runs the bf16 matrix benchmark (~0.5 s).

        Args:
            shape: the model's shape, None when its family is unknown.
            lora_rank: the adapters' rank.
            lora_targets: `lora.target_modules` in the loaded model's names.
        """
        if self.device is None:
            raise RuntimeError("the throughput meter has seen no training")
        peak = peak_memory_gib(self.device)  # before the benchmark, whose matrices would raise it
        flops = None
        if shape is not None and self.timed.tokens.real:
            targets = arch.targeted_projections(lora_targets, shape.layers)
            flops = model_flops(shape, self.timed.tokens, lora_rank, targets) / self.timed.tokens.real
        on_gpu = self.device.type == "cuda"
        index = torch.cuda.current_device() if on_gpu and self.device.index is None else self.device.index
        memory_device = f"cuda:{index}" if on_gpu else "cpu"
        rate = measured_bf16_rate(self.device) if on_gpu else None
        return Throughput(self.first_step, self.timed, peak, memory_device, flops, rate, self.processes)

    def _boundary(self) -> None:
        self._trained_before_evaluation = len(self._collated)
        self._since = self.clock()


def _nothing() -> None:
    """Nothing to wait for: CPU work is done when the host's call returns."""


def meter_throughput(trainer: Trainer) -> ThroughputMeter:
    """Counts what `trainer` trains and times its steps: its collator goes through the meter, which it calls back."""
    meter = ThroughputMeter(trainer.data_collator)
    trainer.data_collator = meter.collate
    trainer.add_callback(meter)
    return meter
