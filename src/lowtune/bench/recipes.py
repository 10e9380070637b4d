"""The recipes the benchmark races on one model: the tutorial's, lowtune's, and (when installed) Unsloth's.

Each runs in its own process (see `worker`), so that global patches (liger, Unsloth) and peak-memory counters
never leak from one recipe into the next. Throughput counts real (non-padding) tokens of steady-state steps.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lowtune.config import LoraSettings, RunConfig, TrainSettings
from lowtune.data.templates import IGNORE_INDEX
from lowtune.machine import this_machine
from lowtune.model.lora import attach_lora
from lowtune.train.memory import peak_memory_gib
from lowtune.train.resolve import resolve_run
from lowtune.train.trainer import build_trainer

Rows = list[dict[str, list[int]]]
# The tutorial's target_modules (c_attn, c_proj, w1, w2) on the converted model: all seven projections.
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAME_SAMPLES = 64  # records on which both recipes' losses are compared before training
TUTORIAL_BATCH = (8, 2)  # records per micro-batch, accumulation: the tutorial's
JOB_DROPOUT = 0.1  # the tutorial's lora_dropout
LOGGING_STEPS = 2  # every recipe logs its loss every second step (the tutorial's 10 would log once in a short run)


@dataclass
class Measurement:
    recipe: str
    quantization: str
    tokens_per_second: float
    peak_gib: float
    steps_timed: int
    seconds_per_step: float
    tokens_per_step: float
    loss_same_samples: float | None
    first_loss: float
    last_loss: float
    planned_peak_gib: float | None = None
    # What the allocator held at most (allocated or cached): with CUDA graphs, their memory pool stays reserved.
    reserved_gib: float | None = None
    checkpointing: str | None = None
    batching: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepClock(TrainerCallback):
    """Times optimizer steps `warmup` + 1 to `last` on the GPU clock, and counts their real tokens.

    It waits for the GPU only at those two marks, and sums the token counts on the GPU, so that it adds no host sync
    to the steps it times (a sync a step would hide a recipe's own syncs, or add some to one that has none).
    """

    def __init__(self, warmup: int, last: int):
        self.warmup, self.last = warmup, last
        self.step_tokens: list[torch.Tensor | int] = []  # this step's micro-batches
        self.counted: list[list[torch.Tensor | int]] = []  # per timed step
        self.marks: list[float] = []

    def count(self, inputs: dict[str, Any]) -> None:
        mask = inputs.get("attention_mask")
        real = inputs.get("real_tokens", inputs["input_ids"].numel())  # rows padded for CUDA graphs say how many
        self.step_tokens.append(mask.sum() if mask is not None else real)

    def on_step_end(self, args, state, control, **kwargs):
        if self.warmup < state.global_step <= self.last:
            self.counted.append(self.step_tokens)
        self.step_tokens = []
        if state.global_step in (self.warmup, self.last):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    def rate(self) -> tuple[float, int, float, float]:
        """(tokens/s, steps timed, seconds per step, tokens per step) over the timed steps."""
        seconds, steps = self.marks[-1] - self.marks[0], len(self.counted)
        tokens = sum(int(count) for step in self.counted for count in step)
        return tokens / seconds, steps, seconds / steps, tokens / steps


class ProfileSteps(TrainerCallback):
    """torch.profiler over a few steady-state steps; writes the operators by self GPU and by self host time to
    `path`, and the host and GPU timelines side by side as a Chrome trace beside it (`.trace.json`: open it in
    Perfetto, or summarise it with bench/trace_summary.py)."""

    def __init__(self, path: str, start: int, count: int = 2):
        self.path, self.start, self.stop = path, start, start + count
        self.profiler: torch.profiler.profile | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.stop:
            torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            tables = [
                averages.table(sort_by=key, row_limit=45, max_name_column_width=70)
                for key in ("self_cuda_time_total", "self_cpu_time_total")
            ]
            with open(self.path, "w", encoding="utf-8") as file:
                file.write(f"{self.stop - self.start} steps, by GPU time, then by host time\n" + "\n".join(tables))
            self.profiler.export_chrome_trace(str(Path(self.path).with_suffix(".trace.json")))
            self.profiler = None


def same_samples_loss(model: PreTrainedModel, rows: Rows, collate: Callable[[Rows], dict], batch: int) -> float:
    """Token-weighted mean loss over `rows` through this recipe's own batching and forward."""
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16):
        for start in range(0, len(rows), batch):
            inputs = collate(rows[start : start + batch])
            labels = inputs["labels"]
            inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            total += model(**inputs, num_items_in_batch=1).loss.float().item()  # a sum over the batch's targets
            tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    model.train()
    return total / tokens


def timed_training(
    name: str, quantization: str, trainer: Trainer, warmup: int, steps: int, same_loss: float | None
) -> Measurement:
    """Trains, timing steps `warmup` to `steps` and counting the real tokens of every micro-batch."""
    clock = StepClock(warmup, steps)
    trainer.add_callback(clock)
    train_step = trainer.training_step

    def counted_step(model, inputs, *args, **kwargs):
        clock.count(inputs)
        return train_step(model, inputs, *args, **kwargs)

    trainer.training_step = counted_step
    trainer.train()
    rate, timed, step_seconds, step_tokens = clock.rate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    measured = Measurement(
        name,
        quantization,
        rate,
        peak_memory_gib(),
        timed,
        step_seconds,
        step_tokens,
        same_loss,
        losses[0],
        losses[-1],
    )
    if torch.cuda.is_available():
        measured.reserved_gib = torch.cuda.max_memory_reserved() / 2**30
    return measured


def tutorial_recipe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Rows,
    quantization: str,
    steps: int,
    warmup: int,
    batch: tuple[int, int] = TUTORIAL_BATCH,
    dropout: float = JOB_DROPOUT,
) -> Measurement:
    """The Qwen-7B-Chat tutorial, as written: Trainer, DataCollatorForSeq2Seq padding, `batch` records x
    accumulation (its own 8 x 2 unless the regime says otherwise), checkpointing with enable_input_require_grads,
    LoRA r 8 / alpha 32 / dropout 0.1 (unless `dropout` says otherwise), lr 1e-4 (bf16 for fp16)."""
    model.enable_input_require_grads()
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=SEVEN_PROJECTIONS,
        inference_mode=False,
        r=8,
        lora_alpha=32,
        lora_dropout=dropout,
    )
    model = get_peft_model(model, config)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch[0],
        gradient_accumulation_steps=batch[1],
        logging_steps=LOGGING_STEPS,
        num_train_epochs=3,
        gradient_checkpointing=True,
        save_strategy="no",
        learning_rate=1e-4,
        save_on_each_node=True,
        bf16=True,
        use_cpu=not torch.cuda.is_available(),
        max_steps=steps,
        report_to="none",
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)
    same_loss = same_samples_loss(model, rows[:SAME_SAMPLES], collator, 8)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    return timed_training("tutorial", quantization, trainer, warmup, steps, same_loss)


def lowtune_recipe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Rows,
    quantization: str,
    steps: int,
    warmup: int,
    tokens_per_batch: int | None = None,
    profile: str | None = None,
    checkpointing: str = "auto",
    batch: tuple[int, int] | None = None,
    dropout: float = JOB_DROPOUT,
) -> Measurement:
    """lowtune's own training of the same job: the same LoRA and learning rate, batches of `tokens_per_batch`
    tokens or `batch` records x accumulation, and whatever `lowtune train` picks on this machine (packing,
    attention, kernels, loss, merged micro-batches, and checkpointing unless `checkpointing` sets
    train.gradient_checkpointing)."""
    profiled = 2 if profile else 0  # profiled steps come after the timed ones: the profiler slows them
    records, accumulation = batch or (None, 1)
    train = TrainSettings(
        max_steps=steps + profiled,
        tokens_per_batch=tokens_per_batch,
        batch_size=records,
        gradient_accumulation=accumulation,
        learning_rate=1e-4,
        logging_steps=LOGGING_STEPS,
        save_steps=0,
        scheduler="linear",
        gradient_checkpointing=checkpointing,
    )
    config = RunConfig(
        lora=LoraSettings(r=8, alpha=32, dropout=dropout, target_modules=SEVEN_PROJECTIONS),
        train=train,
        output_dir=tempfile.mkdtemp(),
    )
    config.model.precision = "bf16"
    config.model.quantization = quantization
    lengths = [len(row["input_ids"]) for row in rows]
    resolved = resolve_run(config, this_machine(), model.config.to_dict(), lengths, chat_format="seed")
    resolved.log()
    model = attach_lora(model, config.lora, resolved.lora_targets, resolved.checkpointing)
    trainer = build_trainer(config, resolved, model, tokenizer, rows)
    same_loss = same_samples_loss(trainer.model, rows[:SAME_SAMPLES], trainer.data_collator, 8)
    if profile:
        trainer.add_callback(ProfileSteps(profile, start=steps, count=profiled))
    measured = timed_training("lowtune", quantization, trainer, warmup, steps, same_loss)
    measured.planned_peak_gib = resolved.plan.total / 2**30
    measured.checkpointing = resolved.checkpointing.describe(resolved.plan.layers)
    measured.batching = resolved.batching.describe()
    return measured
