"""`lowtune bench`: the tutorial's recipe against lowtune's (and Unsloth's) on one GPU, in the same run.

For each quantization, each recipe trains the same Qwen-7B-shaped model in its own process; the table shows real
tokens/s, peak GPU memory, the ratio to the tutorial, and each recipe's loss on the same 64 records before training
(equal up to bf16 rounding when both compute the same function). One JSON line per quantization goes to
`bench/results.jsonl`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lowtune.errors import UserError
from lowtune.machine import this_machine
from lowtune.train.allocator import EXPANDABLE_SEGMENTS

QUANTIZATIONS = ("4bit", "8bit", "none")
CHECKPOINTING_SETTINGS = ("auto", "offload", "true", "false")  # lowtune's train.gradient_checkpointing
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth")


def run_bench(
    quantizations: list[str],
    steps: int,
    warmup: int,
    tokens_per_batch: int,
    peer: str | None,
    layers: int | None,
    results: Path,
    console: Console,
    profile_dir: Path | None = None,
    checkpointing: str = "auto",
) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        raise UserError.one("lowtune bench measures GPU training and needs a CUDA device")
    recipes = ["tutorial", "lowtune"] + ([peer] if peer else [])
    lines = []
    for quantization in quantizations:
        measured = {}
        for recipe in recipes:
            console.print(f"[bold]{quantization}: {recipe}[/]")
            profile = profile_dir / f"profile-{quantization}.txt" if profile_dir and recipe == "lowtune" else None
            measured[recipe] = _measure(
                recipe, quantization, steps, warmup, tokens_per_batch, layers, console, profile, checkpointing
            )
        lines.append(_result_line(quantization, measured, steps, tokens_per_batch, layers))
    console.print(results_table(lines))
    if layers is None:  # cut-down models are for checking the bench, not for the record
        results.parent.mkdir(parents=True, exist_ok=True)
        with results.open("a", encoding="utf-8") as file:
            file.writelines(json.dumps(line) + "\n" for line in lines)
        console.print(f"appended {len(lines)} lines to {results}")
    return lines


def _measure(
    recipe: str,
    quantization: str,
    steps: int,
    warmup: int,
    tokens_per_batch: int,
    layers: int | None,
    console: Console,
    profile: Path | None = None,
    checkpointing: str = "auto",
) -> dict[str, Any] | None:
    command = [
        sys.executable,
        "-m",
        "lowtune.bench.worker",
        recipe,
        quantization,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--tokens-per-batch",
        str(tokens_per_batch),
    ]
    command += ["--layers", str(layers)] if layers else []
    command += ["--profile", str(profile)] if profile else []
    command += ["--checkpointing", checkpointing] if recipe == "lowtune" else []
    environment = os.environ.copy()
    if recipe == "lowtune":  # lowtune's own choice (see cli.main), not imposed on the other recipes
        environment.setdefault("PYTORCH_CUDA_ALLOC_CONF", EXPANDABLE_SEGMENTS)
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        console.print(f"[red]{recipe} {quantization} failed[/]:\n{done.stderr[-3000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _result_line(
    quantization: str, measured: dict[str, Any], steps: int, tokens_per_batch: int, layers: int | None
) -> dict[str, Any]:
    seed, ours = measured.get("tutorial"), measured.get("lowtune")
    line: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": this_machine().describe(),
        "versions": _versions(),
        "quantization": quantization,
        "layers": layers or 32,
        "steps": steps,
        "tokens_per_batch": tokens_per_batch,
        "seed_tok_s": seed and seed["tokens_per_second"],
        "ours_tok_s": ours and ours["tokens_per_second"],
        "ratio": seed and ours and ours["tokens_per_second"] / seed["tokens_per_second"],
        "seed_peak_gib": seed and seed["peak_gib"],
        "peak_gib": ours and ours["peak_gib"],
        "plan_gib": ours and ours["planned_peak_gib"],
        "seed_loss_same_samples": seed and seed["loss_same_samples"],
        "ours_loss_same_samples": ours and ours["loss_same_samples"],
        "measurements": measured,
    }
    for peer, values in measured.items():
        if peer not in ("tutorial", "lowtune") and values:
            line |= {f"{peer}_tok_s": values["tokens_per_second"], f"{peer}_peak_gib": values["peak_gib"]}
    return line


def results_table(lines: list[dict[str, Any]]) -> Table:
    table = Table(title="lowtune bench: real tokens/s and peak GPU memory (same model, data and LoRA)")
    columns = (
        "mode",
        "recipe",
        "tokens/s",
        "x tutorial",
        "peak GiB",
        "plan GiB",
        "loss, same 64 records",
        "tokens/step",
        "checkpointing",
    )
    for column in columns:
        table.add_column(column, justify="right" if column not in ("mode", "recipe") else "left")
    for line in lines:
        seed = line["measurements"].get("tutorial")
        for recipe, values in line["measurements"].items():
            if values is None:
                table.add_row(line["quantization"], recipe, "failed", *[""] * (len(columns) - 3))
                continue
            ratio = f"{values['tokens_per_second'] / seed['tokens_per_second']:.1f}x" if seed else ""
            table.add_row(
                line["quantization"],
                recipe,
                f"{values['tokens_per_second']:,.0f}",
                ratio,
                f"{values['peak_gib']:.1f}",
                f"{values['planned_peak_gib']:.1f}" if values.get("planned_peak_gib") else "",
                f"{values['loss_same_samples']:.4f}" if values.get("loss_same_samples") is not None else "",
                f"{values['tokens_per_step']:,.0f}",
                values.get("checkpointing") or "",
            )
    return table


def _versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
