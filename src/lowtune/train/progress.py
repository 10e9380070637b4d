"""A rich progress bar for Trainer: steps, loss, learning rate, elapsed time and ETA on one line, and a second bar
for each evaluation (records done, ETA) while it runs, the opening one included.

The ETAs are lowtune's own, not rich's (which averages the last 30 s of updates, so that steps or batches slower
than that never get one): training's counts the seconds of the optimizer steps alone, from the first step on, plus
the evaluations still to come at the last one's pace; an evaluation's counts the held-out tokens done (its
batches grow longer as it goes: records are evaluated shortest first).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text
from transformers import TrainerCallback

# The event LowtuneTrainer.evaluate sends after each batch (Trainer's own, with these keywords added).
EVAL_EVENT = "on_prediction_step"


class EtaColumn(ProgressColumn):
    """The time left, from the task's `finish_at` field (a clock reading, or None before there is an estimate)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.clock = clock

    def render(self, task: Task) -> Text:
        finish_at = task.fields.get("finish_at")
        if finish_at is None:
            return Text("eta -:--:--", style="progress.remaining")
        left = max(0, round(finish_at - self.clock()))
        return Text(f"eta {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}", style="progress.remaining")


def evaluations_due(step: int, last: int, every: int) -> int:
    """Evaluations after `step`: at each multiple of `every` up to `last`, and at `last` (FinalEvaluation)."""
    return last // every - step // every + (1 if last % every and step < last else 0)


class RichProgressCallback(TrainerCallback):
    """Replaces transformers' tqdm bar; log lines go above the bars instead of breaking them."""

    def __init__(self, console: Console | None = None, clock: Callable[[], float] = time.monotonic):
        self.console = console or Console(stderr=True)
        self.clock = clock
        self.progress: Progress | None = None
        self.task = None
        self.eval_task = None
        self.step_seconds = 0.0  # of the optimizer steps alone (no evaluation, no save)
        self.steps_timed = 0
        self.eval_seconds: float | None = None  # the last evaluation's
        self._since = 0.0  # the end of the last step, evaluation or save
        self._eval_started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            EtaColumn(self.clock),
            console=self.console,
            transient=False,
            refresh_per_second=2,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, status="", finish_at=None
        )
        self._since = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        now = self.clock()
        self.step_seconds += now - self._since
        self.steps_timed += 1
        self._since = now
        self.progress.update(self.task, completed=state.global_step, finish_at=now + self._seconds_left(args, state))

    def _seconds_left(self, args, state) -> float:
        steps_left = max(0, state.max_steps - state.global_step)
        seconds = steps_left * self.step_seconds / self.steps_timed
        if self.eval_seconds is not None and args.eval_strategy != "no" and args.eval_steps:
            seconds += evaluations_due(state.global_step, state.max_steps, int(args.eval_steps)) * self.eval_seconds
        return seconds

    def on_prediction_step(
        self, args, state, control, records_done=None, records_total=None, tokens_done=0, tokens_total=0, **kwargs
    ):
        """An evaluation's batch is done: `records_done` of `records_total` (0 before the first), the input tokens
        done of their total give the pace."""
        if self.progress is None or not records_total:
            return
        now = self.clock()
        if self.eval_task is None:
            self._eval_started = now
            self.eval_task = self.progress.add_task(
                "eval", total=records_total, completed=0, status="records", finish_at=None
            )
        if not records_done:
            return
        share = tokens_done / tokens_total if tokens_total else records_done / records_total
        elapsed = now - self._eval_started
        self.progress.update(
            self.eval_task, completed=records_done, finish_at=now + elapsed * (1 - share) / max(share, 1e-9)
        )

    def on_evaluate(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        if self.eval_task is not None:
            self.eval_seconds = self.clock() - self._eval_started
            self.progress.remove_task(self.eval_task)
            self.eval_task = None
        self._since = self.clock()

    def on_save(self, args, state, control, **kwargs):
        self._since = self.clock()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        parts = []
        if "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "eval_loss" in logs:
            parts.append(f"eval {logs['eval_loss']:.4f}")
        if parts:
            self.progress.update(self.task, status=" ".join(parts))
            self.progress.console.print(f"step {state.global_step}: " + ", ".join(parts), highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None
