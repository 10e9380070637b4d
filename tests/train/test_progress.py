"""The progress bars: every evaluation, the opening one included, advances its own bar record by record with an ETA,
and training shows an ETA from its first step on."""

from __future__ import annotations

import pytest
from rich.progress import Progress

from lowtune.recipe import run
from lowtune.train.progress import EtaColumn, RichProgressCallback, evaluations_due
from tests.conftest import MEMORISE, tiny_config, write_jsonl


def test_evaluations_and_training_show_their_progress(tmp_path, tiny_qwen2, monkeypatch):
    seen: list[tuple[str, int, int, int, bool]] = []  # (bar, step, done, total, has an ETA)

    def watch(name: str, event: str) -> None:
        original = getattr(RichProgressCallback, event)

        def spy(self, args, state, control, **kwargs):
            original(self, args, state, control, **kwargs)
            task_id = self.eval_task if name == "eval" else self.task
            if self.progress is not None and task_id is not None:
                task = self.progress._tasks[task_id]
                seen.append((name, state.global_step, task.completed, task.total, task.fields["finish_at"] is not None))

        monkeypatch.setattr(RichProgressCallback, event, spy)

    watch("eval", "on_prediction_step")
    watch("train", "on_step_end")
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE * 3)
    config = tiny_config(tiny_qwen2, data, tmp_path / "run", max_steps=4, batch_size=2)
    config.data.val_size = 6  # three evaluation batches of two records
    config.train.eval_steps = 2
    run(config)

    opening = [entry for entry in seen if entry[0] == "eval" and entry[1] == 0]
    assert [done for _, _, done, _, _ in opening] == [0, 2, 4, 6]  # the bar appears before the first batch
    assert all(total == 6 for *_, total, _ in opening)
    assert not opening[0][4] and all(eta for *_, eta in opening[1:])  # an ETA once a batch is done
    evaluated_at = sorted({step for name, step, *_ in seen if name == "eval"})
    assert evaluated_at == [0, 2, 4]
    trained = [entry for entry in seen if entry[0] == "train"]
    assert [step for _, step, *_ in trained] == [1, 2, 3, 4]
    assert all(eta for *_, eta in trained)  # from the first step on


@pytest.mark.parametrize(("step", "last", "every", "due"), [(0, 4, 2, 2), (1, 4, 2, 2), (4, 4, 2, 0), (0, 7, 3, 3)])
def test_evaluations_due_counts_the_final_one(step, last, every, due):
    assert evaluations_due(step, last, every) == due


def test_eta_column_counts_down_from_the_estimate():
    now = [100.0]
    column = EtaColumn(clock=lambda: now[0])
    progress = Progress()
    waiting = progress.add_task("train", total=10, finish_at=None)
    estimated = progress.add_task("train", total=10, finish_at=100.0 + 3725)
    assert column.render(progress._tasks[waiting]).plain == "eta -:--:--"
    assert column.render(progress._tasks[estimated]).plain == "eta 1:02:05"
    now[0] += 3725 + 10
    assert column.render(progress._tasks[estimated]).plain == "eta 0:00:00"
