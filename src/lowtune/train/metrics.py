"""The run's log events as JSON lines in `metrics.jsonl`: what a plot, a dashboard or `lowtune studio` reads while
a run goes on (TensorBoard's event files need TensorBoard to read them)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lowtune.train.memory import peak_memory_gib
from lowtune.train.throughput import ThroughputMeter

METRICS_FILE_NAME = "metrics.jsonl"


class MetricsFile(TrainerCallback):
    """Appends one line per log event (training loss, learning rate, evaluation) with the step, the steps in all, the
    seconds since this process started training, the real tokens a second of its steps after the first (the
    throughput meter's count) and the peak memory so far; a resumed run appends to the same file, so its lines go on
    from the checkpoint's step."""

    def __init__(self, folder: str | Path, meter: ThroughputMeter):
        self.path = Path(folder) / METRICS_FILE_NAME
        self.meter = meter
        self._started = time.monotonic()
        self._first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._started, self._first_step = time.monotonic(), state.global_step
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line: dict[str, Any] = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "first_step": self._first_step,  # this process's first step: the rate counts from it
            "seconds": round(time.monotonic() - self._started, 3),
        }
        if self.meter.timed.seconds > 0:
            line["tokens_per_second"] = round(self.meter.timed.tokens.real / self.meter.timed.seconds, 1)
        line["peak_memory_gib"] = round(peak_memory_gib(args.device), 3)
        line |= {key: value for key, value in logs.items() if isinstance(value, int | float)}
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\n")


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    """The lines written so far, as one history: a resumed process's lines replace the stopped one's lines past the
    checkpoint it resumed from; a line cut short by a write in progress is left for the next read."""
    path = Path(folder) / METRICS_FILE_NAME
    if not path.is_file():
        return []
    lines: list[dict[str, Any]] = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            break
        if lines and line["first_step"] != lines[-1]["first_step"]:  # a resumed process
            lines = [kept for kept in lines if kept["step"] <= line["first_step"]]
        lines.append(line)
    return lines
