"""`lowtune bench`: the tutorial's recipe against lowtune's (and Unsloth's) on one GPU, in the same run.

Each regime fixes what one optimizer step holds, for every recipe alike: a token budget (`--tokens-per-batch`,
lowtune's own way to batch), or records per micro-batch x accumulation (`--batch 8x2`, the tutorial's; `2x4`,
Unsloth's notebooks'), each recipe fed those records in its own natural form. For each regime and quantization, each
recipe trains the same Qwen-7B-shaped model in its own process; lowtune runs once per `--checkpointing` setting
(`auto` is what `lowtune train` picks, `offload` is Unsloth's memory policy). The table shows real tokens/s, peak GPU
memory, the ratios to the tutorial and to Unsloth, and each recipe's loss on the same 64 records before training
(equal up to bf16 rounding when both compute the same function). One JSON line per regime and quantization goes to
`bench/results.jsonl`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lowtune.bench.recipes import JOB_DROPOUT
from lowtune.errors import UserError
from lowtune.machine import this_machine
from lowtune.train.allocator import EXPANDABLE_SEGMENTS

QUANTIZATIONS = ("4bit", "8bit", "none")
CHECKPOINTING_SETTINGS = ("auto", "offload", "true", "false")  # lowtune's train.gradient_checkpointing
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth")
PEER = "unsloth"
PEER_CHECKPOINTING_SETTINGS = ("offload", "false")  # Unsloth's "unsloth" (offloaded) and none


@dataclass(frozen=True)
class Regime:
    """What one optimizer step holds: `tokens` (a budget) or `records` per micro-batch x `accumulation`."""

    tokens: int | None = None
    records: int | None = None
    accumulation: int = 1

    @classmethod
    def parse(cls, text: str) -> Regime:
        """'16384' (tokens) or '8x2' (records x accumulation)."""
        batch = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
        if batch and int(batch[1]) > 0 and int(batch[2]) > 0:
            return cls(records=int(batch[1]), accumulation=int(batch[2]))
        if text.strip().isdigit() and int(text) > 0:
            return cls(tokens=int(text))
        raise UserError.one(
            f"cannot read the batch {text!r}", fix="give records x accumulation (--batch 8x2) or a token budget (16384)"
        )

    @property
    def name(self) -> str:
        return f"{self.records} x {self.accumulation} records" if self.records else f"{self.tokens:,} tokens"

    def arguments(self) -> list[str]:
        """The worker's options for this regime."""
        if self.records:
            return ["--batch", f"{self.records}x{self.accumulation}"]
        return ["--tokens-per-batch", str(self.tokens)]


def run_bench(
    quantizations: list[str],
    regimes: list[Regime],
    steps: int,
    warmup: int,
    peer: str | None,
    layers: int | None,
    results: Path,
    console: Console,
    profile_dir: Path | None = None,
    checkpointing: tuple[str, ...] = ("auto",),
    dropout: float = JOB_DROPOUT,
    peer_checkpointing: str = "offload",
) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        raise UserError.one("lowtune bench measures GPU training and needs a CUDA device")
    recipes = ["tutorial"] + [lowtune_name(setting) for setting in checkpointing] + ([peer] if peer else [])
    lines = []
    for regime in regimes:
        for quantization in quantizations:
            measured = {}
            for recipe in recipes:
                console.print(f"[bold]{regime.name}, {quantization}: {recipe}[/]")
                profile = []
                if profile_dir and recipe.startswith("lowtune"):
                    profile = ["--profile", str(profile_dir / f"profile-{quantization}-{recipe.replace(' ', '-')}.txt")]
                options = profile + _recipe_options(recipe, dropout, peer_checkpointing)
                measured[recipe] = _measure(recipe, quantization, regime, steps, warmup, layers, console, options)
            line = _result_line(quantization, regime, measured, steps, layers)
            line["dropout"] = dropout
            if peer:
                line[f"{peer}_checkpointing"] = peer_checkpointing
            lines.append(line)
    console.print(results_table(lines))
    if layers is None:  # cut-down models are for checking the bench, not for the record
        results.parent.mkdir(parents=True, exist_ok=True)
        with results.open("a", encoding="utf-8") as file:
            file.writelines(json.dumps(line) + "\n" for line in lines)
        console.print(f"appended {len(lines)} lines to {results}")
    return lines


def lowtune_name(checkpointing: str) -> str:
    """The recipe's name in results: "lowtune" at auto, "lowtune offload" (etc.) otherwise."""
    return "lowtune" if checkpointing == "auto" else f"lowtune {checkpointing}"


def _recipe_options(recipe: str, dropout: float, peer_checkpointing: str) -> list[str]:
    """The worker's options that differ by recipe: Unsloth takes its checkpointing (its dropout is always 0)."""
    if recipe == PEER:
        return ["--checkpointing", peer_checkpointing]
    if recipe.startswith("lowtune"):
        return ["--dropout", str(dropout), "--checkpointing", recipe.removeprefix("lowtune").strip() or "auto"]
    return ["--dropout", str(dropout)]


def _measure(
    recipe: str,
    quantization: str,
    regime: Regime,
    steps: int,
    warmup: int,
    layers: int | None,
    console: Console,
    options: list[str],
) -> dict[str, Any] | None:
    ours = recipe.startswith("lowtune")
    worker = "lowtune" if ours else recipe
    command = [sys.executable, "-m", "lowtune.bench.worker", worker, quantization, "--steps", str(steps)]
    command += ["--warmup", str(warmup), *regime.arguments(), *options]
    command += ["--layers", str(layers)] if layers else []
    environment = os.environ.copy()
    if ours:  # lowtune's own choice (see cli.main), not imposed on the other recipes
        environment.setdefault("PYTORCH_CUDA_ALLOC_CONF", EXPANDABLE_SEGMENTS)
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        console.print(f"[red]{recipe} {quantization} failed[/]:\n{done.stderr[-3000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _result_line(
    quantization: str, regime: Regime, measured: dict[str, Any], steps: int, layers: int | None
) -> dict[str, Any]:
    seed, ours, peer = measured.get("tutorial"), measured.get("lowtune"), measured.get(PEER)
    line: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": this_machine().describe(),
        "versions": _versions(),
        "regime": regime.name,
        "quantization": quantization,
        "layers": layers or 32,
        "steps": steps,
        "tokens_per_batch": regime.tokens,
        "records_per_step": regime.records and regime.records * regime.accumulation,
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
    if peer:
        line |= {f"{PEER}_tok_s": peer["tokens_per_second"], f"{PEER}_peak_gib": peer["peak_gib"]}
        line[f"{PEER}_reserved_gib"] = peer.get("reserved_gib")
        for recipe, values in measured.items():
            if recipe.startswith("lowtune") and values:
                key = recipe.replace(" ", "_")
                line[f"{key}_over_{PEER}"] = values["tokens_per_second"] / peer["tokens_per_second"]
    return line


def results_table(lines: list[dict[str, Any]]) -> Table:
    table = Table(title="lowtune bench: real tokens/s and peak GPU memory (same model, data and LoRA)")
    columns = (
        "regime",
        "mode",
        "recipe",
        "tokens/s",
        "x tutorial",
        f"x {PEER}",
        "peak GiB",
        "reserved GiB",
        "plan GiB",
        "loss, same 64 records",
        "tokens/step",
        "checkpointing",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("regime", "mode", "recipe") else "right")
    for line in lines:
        seed, peer = line["measurements"].get("tutorial"), line["measurements"].get(PEER)
        for recipe, values in line["measurements"].items():
            head = (line["regime"], line["quantization"], recipe)
            if values is None:
                table.add_row(*head, "failed", *[""] * (len(columns) - 4))
                continue
            rate = values["tokens_per_second"]
            table.add_row(
                *head,
                f"{rate:,.0f}",
                f"{rate / seed['tokens_per_second']:.1f}x" if seed else "",
                f"{rate / peer['tokens_per_second']:.2f}x" if peer else "",
                f"{values['peak_gib']:.1f}",
                f"{values['reserved_gib']:.1f}" if values.get("reserved_gib") else "",
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
