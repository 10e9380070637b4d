"""The recipes the benchmark races on one model: the tutorial's, lowtune's, and (when installed) Unsloth's.

Each runs in its own process (see `worker`), so that global patches (liger, Unsloth) and peak-memory counters
never leak from one recipe into the next. Throughput counts real (non-padding) tokens of steady-state steps.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
    checkpointing: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepClock(TrainerCallback):
    """Times optimizer steps on the GPU clock, from step `warmup` to step `last`."""

    def __init__(self, warmup: int, last: int):
        self.warmup, self.last = warmup, last
        self.tokens = 0
        self.marks: list[tuple[float, int]] = []

    def count(self, inputs: dict[str, Any]) -> None:
        mask = inputs.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self.warmup <= state.global_step <= self.last:
            self.marks.append((time.perf_counter(), self.tokens))

    def rate(self) -> tuple[float, int, float, float]:
        """(tokens/s, steps timed, seconds per step, tokens per step) over the timed steps."""
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        steps = len(self.marks) - 1
        return (n1 - n0) / (t1 - t0), steps, (t1 - t0) / steps, (n1 - n0) / steps


class ProfileSteps(TrainerCallback):
    """torch.profiler over a few steady-state steps; writes the kernels by self CUDA time to `path`."""

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
            table = self.profiler.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70
            )
            with open(self.path, "w", encoding="utf-8") as file:
                file.write(f"{self.stop - self.start} steps\n{table}\n")
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
    return Measurement(
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


def tutorial_recipe(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Rows, quantization: str, steps: int, warmup: int
) -> Measurement:
    """The Qwen-7B-Chat tutorial, as written: Trainer, DataCollatorForSeq2Seq padding, batch 8 x accumulation 2,
    checkpointing with enable_input_require_grads, LoRA r 8 / alpha 32 / dropout 0.1, lr 1e-4 (bf16 for fp16)."""
    model.enable_input_require_grads()
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=SEVEN_PROJECTIONS,
        inference_mode=False,
        r=8,
        lora_alpha=32,
        lora_dropout=0.1,
    )
    model = get_peft_model(model, config)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        logging_steps=1,
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
    tokens_per_batch: int,
    profile: str | None = None,
    checkpointing: str = "auto",
) -> Measurement:
    """lowtune's own training of the same job: the same LoRA and learning rate, batches of `tokens_per_batch`
    tokens, and whatever `lowtune train` picks on this machine (packing, attention, kernels, loss, and checkpointing
    unless `checkpointing` sets train.gradient_checkpointing)."""
    profiled = 2 if profile else 0  # profiled steps come after the timed ones: the profiler slows them
    train = TrainSettings(
        max_steps=steps + profiled,
        tokens_per_batch=tokens_per_batch,
        learning_rate=1e-4,
        logging_steps=1,
        save_steps=0,
        scheduler="linear",
        gradient_checkpointing=checkpointing,
    )
    config = RunConfig(
        lora=LoraSettings(r=8, alpha=32, dropout=0.1, target_modules=SEVEN_PROJECTIONS),
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
    return measured
