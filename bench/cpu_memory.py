"""Peak resident memory of a CPU run against `lowtune plan`'s host-memory plan, part by part.

    python bench/cpu_memory.py [--steps 2] [--config examples/huanhuan-qlora.yaml] [section.key=value ...]

Runs the config's first steps as `lowtune train` does (no evaluation, no saving), its largest micro-batch first so
that the peak the plan predicts is reached at once, and prints the resident memory (RSS) after each phase (imports,
records and tokenizer, weights, adapters, the steps), each step's seconds and the RSS after it, and the process's
peak beside the plan, as one JSON line last.
tests/train/test_memory.py runs it on the default example.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import psutil

START_RSS = psutil.Process().memory_info().rss

from transformers import TrainerCallback  # noqa: E402 (the interpreter's own memory is read first)

from lowtune.config import load_config  # noqa: E402
from lowtune.model.load import load_weights  # noqa: E402
from lowtune.model.lora import attach_lora  # noqa: E402
from lowtune.recipe import align_special_tokens, prepare  # noqa: E402
from lowtune.train.memory import GIB  # noqa: E402
from lowtune.train.trainer import build_trainer  # noqa: E402


def rss() -> float:
    return psutil.Process().memory_info().rss / GIB


def peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # kilobytes on Linux


class StepTimes(TrainerCallback):
    """Each step's seconds and the resident memory after it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.rss_gib: list[float] = []
        self.started = 0.0

    def on_step_begin(self, *args, **kwargs) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, *args, **kwargs) -> None:
        self.seconds.append(round(time.perf_counter() - self.started, 1))
        self.rss_gib.append(round(rss(), 3))


def largest_first(sampler) -> None:
    """The sampler's plan with its largest batch (padded tokens) moved to the front."""
    plan = sampler.plan

    def reordered(epoch: int) -> list[list[int]]:
        batches = plan(epoch)
        cost = [max(sampler.lengths[i] for i in batch) * len(batch) for batch in batches]
        first = cost.index(max(cost))
        return [batches[first], *batches[:first], *batches[first + 1 :]]

    sampler.plan = reordered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--config", default="examples/huanhuan-qlora.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    phases = {"interpreter": START_RSS / GIB, "imports": rss()}
    overrides = ["output_dir=/tmp/lowtune-cpu-memory", f"train.max_steps={args.steps}", "train.save_steps=0"]
    overrides += ["data.val_size=0", "train.eval_steps=null", "train.logging_steps=1"]
    config = load_config(args.config, overrides + args.overrides)
    setup = prepare(config, overwrite=True)
    phases["records and tokenizer"] = rss()
    resolved = setup.resolved
    model = load_weights(config.model, resolved.loading)
    align_special_tokens(model, setup.tokenizer)
    phases["weights"] = rss()
    model = attach_lora(model, config.lora, resolved.lora_targets, resolved.checkpointing)
    trainer = build_trainer(config, resolved, model, setup.tokenizer, setup.data.rows)
    largest_first(trainer.batch_sampler)
    steps = StepTimes()
    trainer.add_callback(steps)
    phases["adapters and trainer"] = rss()
    started = time.perf_counter()
    trainer.train()
    phases["after the steps"] = rss()
    plan = resolved.plan
    record = {
        "phases_gib": {name: round(value, 3) for name, value in phases.items()},
        "peak_rss_gib": round(peak(), 3),
        "planned_gib": round(plan.total / GIB, 3) if plan else None,
        "plan": plan.summary() if plan else None,
        "largest_tokens": resolved.batching.largest,
        "steps": args.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "step_seconds": steps.seconds,
        "step_rss_gib": steps.rss_gib,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
