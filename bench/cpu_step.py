"""Time training steps (and one evaluation) of the default example on this CPU, with overrides: a probe for CPU work.

    python bench/cpu_step.py --steps 6 [--eval] [--profile FILE] [section.key=value ...]

Prints the resolved choices, each step's seconds and their sum (the first step also fills the dense base weights),
and with --eval one held-out evaluation's seconds. To stand in for a CPU without native bf16 on one that has it,
cap the libraries' instruction sets: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, and
MKL_ENABLE_INSTRUCTIONS=SSE4_2 for MKL's code path on CPUs not made by Intel, or =AVX2 for an Intel one
(docs/quality.md).
"""

from __future__ import annotations

import argparse
import logging
import time

from transformers import TrainerCallback

from lowtune.config import load_config
from lowtune.model.load import load_weights
from lowtune.model.lora import attach_lora
from lowtune.recipe import align_special_tokens, prepare
from lowtune.train.trainer import build_trainer


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval", action="store_true", help="also time one evaluation of the held-out records")
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of steps 3 to the end here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    overrides = ["output_dir=/tmp/lowtune-cpu-step", f"train.max_steps={args.steps}", "train.save_steps=0"]
    if not args.eval:
        overrides += ["data.val_size=0", "train.eval_steps=null"]
    config = load_config("examples/huanhuan-qlora.yaml", overrides + args.overrides)
    config.train.logging_steps = 1
    setup = prepare(config, overwrite=True)
    resolved = setup.resolved
    model = load_weights(config.model, resolved.loading)
    align_special_tokens(model, setup.tokenizer)
    model = attach_lora(model, config.lora, resolved.lora_targets, resolved.checkpointing)
    held_out = setup.held_out_rows if args.eval else None
    trainer = build_trainer(config, resolved, model, setup.tokenizer, setup.data.rows, held_out)
    if args.eval:
        trainer.args.eval_strategy = "no"  # timed below, once, on its own
    times = StepTimes()
    trainer.add_callback(times)
    profiler = None
    if args.profile:
        import torch

        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        trainer.add_callback(_ProfileFrom(profiler, start=2))
    trainer.train()
    print("steps:", " ".join(f"{s:.2f}" for s in times.seconds), f"sum {sum(times.seconds):.1f} s", flush=True)
    if args.eval:
        started = time.perf_counter()
        metrics = trainer.evaluate()
        print(f"eval: {time.perf_counter() - started:.1f} s, loss {metrics['eval_loss']:.4f}", flush=True)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        with open(args.profile, "w", encoding="utf-8") as file:
            file.write(table)


class _ProfileFrom(TrainerCallback):
    def __init__(self, profiler, start: int):
        self.profiler, self.start = profiler, start

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            self.profiler.__enter__()


if __name__ == "__main__":
    main()
