"""What the studio may touch: the workspace folder (configs, data, runs) and the model folders named at its start.

Every path that a page sends is resolved here, symbolic links and `..` included, and refused unless it lies inside
one of those roots; nothing else in the studio opens a path that a request named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lowtune.config import CONFIG_FILE_NAME, load_run_config
from lowtune.errors import UserError
from lowtune.train.metrics import read_metrics
from lowtune.train.resume import complete_checkpoints

STUDIO_FOLDER = ".studio"  # in the workspace: the processes the studio started, their output, their configs
SUMMARY_FILE_NAME = "run_summary.json"
RunState = Literal["running", "finished", "stopped", "failed", "new"]


class PathRefused(UserError):
    """A path outside the workspace and the model folders."""


@dataclass(frozen=True)
class Workspace:
    root: Path
    model_folders: tuple[Path, ...] = ()

    @classmethod
    def at(cls, root: str | Path, model_folders: list[str | Path] | None = None) -> Workspace:
        return cls(Path(root).resolve(), tuple(Path(folder).resolve() for folder in model_folders or []))

    @property
    def roots(self) -> tuple[Path, ...]:
        return (self.root, *self.model_folders)

    def path(self, given: str | Path, models_too: bool = False) -> Path:
        """`given` (relative to the workspace, or absolute) resolved; refused outside the workspace (and, with
        `models_too`, the model folders)."""
        resolved = (self.root / given).resolve()
        allowed = self.roots if models_too else (self.root,)
        if not any(resolved == root or root in resolved.parents for root in allowed):
            where = "the workspace or a model folder given to lowtune studio" if models_too else "the workspace"
            raise PathRefused.one(
                f"{given}: outside {where}",
                fix=f"choose a path under {self.root}" + (" or --model-dir" if models_too else ""),
            )
        return resolved

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if self.root in path.parents or path == self.root else str(path)

    def runs(self) -> list[Path]:
        """Every run folder under the workspace (a folder with a lowtune.yaml that `lowtune train` wrote), newest
        first."""
        found = {
            config.parent
            for config in self.root.rglob(CONFIG_FILE_NAME)
            if not config.parent.name.startswith(("checkpoint-", ".")) and STUDIO_FOLDER not in config.parts
        }
        found |= {job.run for job in self.jobs()}
        return sorted(found, key=lambda folder: _modified(folder), reverse=True)

    def studio_file(self, run: Path, kind: str) -> Path:
        """The studio's own file of this kind (job.json, log, yaml) for a run folder, under .studio/."""
        name = self.relative(run).replace(os.sep, "__")
        return self.root / STUDIO_FOLDER / f"{name}.{kind}"

    def jobs(self) -> list[Job]:
        """The training processes that studios started here."""
        folder = self.root / STUDIO_FOLDER
        return [Job.read(path) for path in folder.glob("*.train.job.json")] if folder.is_dir() else []

    def job(self, run: Path, task: str = "train") -> Job | None:
        """The last process a studio started for this run and task (train, export)."""
        path = self.studio_file(run, f"{task}.job.json")
        return Job.read(path) if path.is_file() else None


@dataclass(frozen=True)
class Job:
    """A `lowtune` process that a studio started for a run folder; any studio reads it from .studio/."""

    run: Path
    pid: int
    command: list[str]
    started: float

    @classmethod
    def read(cls, path: Path) -> Job:
        values = json.loads(path.read_text(encoding="utf-8"))
        return cls(Path(values["run"]), values["pid"], values["command"], values["started"])

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        values = {"run": str(self.run), "pid": self.pid, "command": self.command, "started": self.started}
        temporary.write_text(json.dumps(values), encoding="utf-8")
        temporary.replace(path)

    @property
    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process of that number
            return False
        return not _is_zombie(self.pid)


def run_state(workspace: Workspace, folder: Path) -> RunState:
    job = workspace.job(folder)
    if job is not None and job.alive:
        return "running"
    if (folder / SUMMARY_FILE_NAME).is_file():
        return "finished"
    if complete_checkpoints(folder):
        return "stopped"
    if job is not None:
        return "failed"
    return "new"


def run_overview(workspace: Workspace, folder: Path) -> dict[str, Any]:
    """A run as the runs page lists it: its state, progress and last figures."""
    metrics = read_metrics(folder)
    losses = [line for line in metrics if "loss" in line]
    last = metrics[-1] if metrics else {}
    overview: dict[str, Any] = {
        "path": workspace.relative(folder),
        "state": run_state(workspace, folder),
        "step": last.get("step", 0),
        "max_steps": last.get("max_steps"),
        "loss": losses[-1]["loss"] if losses else None,
        "checkpoints": [checkpoint.name for checkpoint in complete_checkpoints(folder)],
    }
    if (folder / CONFIG_FILE_NAME).is_file():
        overview["base"] = load_run_config(folder).model.path or "embedded SmolLM2-135M-Instruct"
    return overview


def _modified(folder: Path) -> float:
    return folder.stat().st_mtime if folder.exists() else 0.0


def _is_zombie(pid: int) -> bool:
    """A child that ended but was not reaped yet still answers kill(pid, 0)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return False
