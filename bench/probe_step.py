"""Where does a lowtune training step go? Per-step wall time of lowtune's 4-bit recipe with one knob changed at a time.

Run on the GPU machine:  python bench/probe_step.py [--layers N] [--steps N]
Every variant trains a fresh adapter on the same 4-bit Qwen-7B-shaped model in this one process (variants that
install global patches, liger's, come last), prints the wall time of each step, and the first variant writes a
torch.profiler table of one step sorted by CPU time (what keeps the GPU waiting) and, with --trace, its timeline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

from lowtune.bench.model import build_random_model, qwen_7b_config
from lowtune.bench.recipes import SEVEN_PROJECTIONS
from lowtune.bench.worker import tutorial_rows
from lowtune.config import LoraSettings, RunConfig, TrainSettings
from lowtune.machine import this_machine
from lowtune.model.lora import attach_lora
from lowtune.model.qwen_tokenizer import build_qwen_tokenizer
from lowtune.train.resolve import resolve_run
from lowtune.train.trainer import build_trainer

VARIANTS = {  # name: (train overrides, lora dropout)
    "no-liger": ({"liger": False}, 0.1),
    "no-liger,no-dropout": ({"liger": False}, 0.0),
    "peft-lora,no-liger": ({"liger": False, "fused_lora": False}, 0.1),
    "default": ({}, 0.1),
    "default,log-every-10": ({"logging_steps": 10}, 0.1),
    "default,32k-tokens": ({"tokens_per_batch": 32768}, 0.1),
    "offload": ({"gradient_checkpointing": "offload"}, 0.1),
    "offload-no-dropout": ({"gradient_checkpointing": "offload"}, 0.0),
}


class WallClock(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run_variant(model, tokenizer, rows, name, overrides, dropout, steps, profile_path=None, trace_path=None):
    settings = dict(max_steps=steps, tokens_per_batch=16384, learning_rate=1e-4, logging_steps=1, save_steps=0)
    train = TrainSettings(**(settings | {"gradient_checkpointing": True} | overrides))
    config = RunConfig(
        lora=LoraSettings(r=8, alpha=32, dropout=dropout, target_modules=SEVEN_PROJECTIONS),
        train=train,
        output_dir=tempfile.mkdtemp(),
    )
    config.model.precision, config.model.quantization = "bf16", "4bit"  # the probe's model (see main)
    lengths = [len(row["input_ids"]) for row in rows]
    resolved = resolve_run(config, this_machine(), model.config.to_dict(), lengths, chat_format="seed")
    peft_model = attach_lora(model, config.lora, resolved.lora_targets, resolved.checkpointing)
    trainer = build_trainer(config, resolved, peft_model, tokenizer, rows)
    clock = WallClock()
    step = trainer.training_step

    def timed_step(*args, **kwargs):
        if (profile_path or trace_path) and len(clock.times) == steps - 2:
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                out = step(*args, **kwargs)
                torch.cuda.synchronize()
            if profile_path:
                with open(profile_path, "w") as file:
                    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60)
                    file.write(table)
            if trace_path:  # the timeline: when each kernel was launched and when it ran, on which stream
                prof.export_chrome_trace(trace_path)
            return out
        return step(*args, **kwargs)

    trainer.training_step = timed_step
    trainer.add_callback(clock)
    trainer.train()
    walls = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    steady = statistics.median(walls[1:]) if len(walls) > 1 else walls[0]
    print(
        f"{name:28s} median step {steady:.3f}s  -> {16384 / steady:,.0f} tok/s (budget)  steps "
        + " ".join(f"{w:.2f}" for w in walls)
        + f"  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
        flush=True,
    )
    base = peft_model.unload()  # back to the bare base for the next variant, without lowtune's patched forwards
    for module in base.modules():
        module.__dict__.pop("forward", None)
    torch.cuda.reset_peak_memory_stats()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--trace", default=None, help="write a Chrome trace of the same step here")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    args = parser.parse_args()
    print("PYTORCH_CUDA_ALLOC_CONF =", os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), file=sys.stderr)
    tokenizer = build_qwen_tokenizer()
    rows = tutorial_rows(tokenizer)
    model = build_random_model(qwen_7b_config(args.layers), "4bit")
    chosen = args.only.split(",") if args.only else list(VARIANTS)
    for index, name in enumerate(chosen):
        overrides, dropout = VARIANTS[name]
        first = index == 0
        run_variant(
            model,
            tokenizer,
            rows,
            name,
            overrides,
            dropout,
            args.steps,
            args.profile if first else None,
            args.trace if first else None,
        )


if __name__ == "__main__":
    main()
