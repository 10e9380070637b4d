"""A short table of a loaded model: parameters, what trains, dtypes and where each part lives."""

from __future__ import annotations

from collections import Counter

import torch
from rich.table import Table


def parameter_count(parameter: torch.nn.Parameter) -> int:
    """Logical number of weights; bitsandbytes packs two 4-bit weights per byte."""
    quant_state = getattr(parameter, "quant_state", None)
    return int(quant_state.shape.numel()) if quant_state is not None else parameter.numel()


def summary_table(model: torch.nn.Module, title: str = "Model") -> Table:
    total = trainable = 0
    by_dtype: Counter[str] = Counter()
    by_device: Counter[str] = Counter()
    for parameter in model.parameters():
        count = parameter_count(parameter)
        total += count
        trainable += count if parameter.requires_grad else 0
        dtype = "4bit" if getattr(parameter, "quant_state", None) is not None else str(parameter.dtype)
        by_dtype[dtype.replace("torch.", "")] += count
        by_device[str(parameter.device)] += count
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_row("parameters", f"{total:,}")
    share = 100 * trainable / total if total else 0.0
    table.add_row("trainable", f"{trainable:,} ({share:.3f}%)")
    table.add_row("dtypes", _shares(by_dtype, total))
    table.add_row("devices", _shares(by_device, total))
    memory = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    table.add_row("weights in memory", f"{memory / 2**30:.2f} GiB")
    return table


def _shares(counter: Counter[str], total: int) -> str:
    return ", ".join(f"{key} {100 * count / total:.1f}%" for key, count in counter.most_common())
