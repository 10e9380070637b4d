"""The `lowtune` processes the studio starts: a run is `lowtune train`, as a user would type it, in its own process
session, so it outlives the page and the studio; Stop is the Ctrl-C that `lowtune train` answers with a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lowtune.errors import UserError
from lowtune.studio.workspace import Job, Workspace


def start(workspace: Workspace, run: Path, arguments: list[str], task: str = "train") -> Job:
    """`lowtune ARGUMENTS` in the workspace for a run's task (train, export), its output in the task's studio log;
    refused while that task, or training, runs there."""
    running = [job for job in (workspace.job(run), workspace.job(run, task)) if job is not None and job.alive]
    if running:
        raise UserError.one(
            f"{workspace.relative(run)}: a lowtune process already runs for this run", fix="wait, or stop it"
        )
    log_path = workspace.studio_file(run, f"{task}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lowtune", *arguments]
    environment = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    with log_path.open("ab") as log:
        log.write(f"$ lowtune {' '.join(arguments)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=workspace.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,  # a closed page, or a stopped studio, does not stop it
        )
    threading.Thread(target=process.wait, daemon=True).start()  # reaped when it ends, while this studio lives
    job = Job(run, process.pid, command, time.time())
    job.write(workspace.studio_file(run, f"{task}.job.json"))
    return job


def stop(workspace: Workspace, run: Path) -> None:
    """SIGINT, as Ctrl-C: `lowtune train` finishes its step, writes a checkpoint and exits."""
    job = workspace.job(run)
    if job is None or not job.alive:
        raise UserError.one(f"{workspace.relative(run)}: nothing runs for this run")
    os.kill(job.pid, signal.SIGINT)


def log_tail(workspace: Workspace, run: Path, task: str = "train", lines: int = 40) -> str:
    """The end of the task's output, as a terminal would show it (a progress bar's redraws as lines)."""
    path = workspace.studio_file(run, f"{task}.log")
    if not path.is_file():
        return ""
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - 64 * 1024))
        text = file.read().decode("utf-8", errors="replace")
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])
