"""Resume a run exactly where its newest complete checkpoint left it, and only the same run.

Checkpoints are written to `.tmp-checkpoint-N` and renamed to `checkpoint-N` when complete (`LowtuneTrainer`), so
every `checkpoint-N` folder is whole. Each holds the config, the run's resolved choices (`resolved.yaml`) and a
fingerprint of the data and model config; resuming with anything that shapes the run changed (model, data, template,
LoRA, batching, optimizer, or a choice this machine resolves differently, such as the precision) is refused with the
list of differences, unless forced. Raising the step or epoch limit to train further is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from lowtune.config import RunConfig, load_run_config
from lowtune.data.cache import file_digest
from lowtune.data.read import resolve_data_path
from lowtune.errors import UserError
from lowtune.train.resolve import Resolved, read_saved_choices

FINGERPRINT_FILE_NAME = "fingerprint.json"
STAGING_PREFIX = ".tmp-checkpoint-"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# What may change between a run and its resumption: how long it trains, how often it logs, saves and evaluates.
MAY_CHANGE = {
    "train.max_steps",
    "train.epochs",
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "train.eval_steps",
    "output_dir",
}
# length follows train.max_steps / train.epochs; down's input made again or kept gives the same gradients to the bit
RESOLVED_MAY_CHANGE = {"length", "down_input"}


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest first (staging folders of an interrupted save are not among them)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)))


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """The checkpoint to resume from: `resume` as a path, or the newest complete one in output_dir ("latest")."""
    if resume != "latest":
        checkpoint = Path(resume)
        if not (checkpoint / "trainer_state.json").is_file():
            raise UserError.one(
                "not a complete lowtune checkpoint (no trainer_state.json)",
                checkpoint,
                fix="give a checkpoint-N folder of the run, or --resume alone for the newest",
            )
        return checkpoint
    checkpoints = complete_checkpoints(output_dir)
    if not checkpoints:
        raise UserError.one(
            "no checkpoint to resume from",
            output_dir,
            fix="train without --resume (train.save_steps sets how often checkpoints are written)",
        )
    return checkpoints[-1]


def check_same_run(
    config: RunConfig, resolved: Resolved, checkpoint: Path, force: bool, mixture: str | None = None
) -> None:
    """Refuses to resume `checkpoint` under a config, data or resolved choices that would make it another run.

    `mixture` is the digest of the records drawn (`Mixture.digest`): a different draw is a different data set.
    """
    saved = load_run_config(checkpoint)
    changes = [
        f"{key}: {before!r} -> {after!r}"
        for key, (before, after) in _differences(saved.model_dump(mode="json"), config.model_dump(mode="json")).items()
        if key not in MAY_CHANGE
    ]
    saved_choices = read_saved_choices(checkpoint)
    if saved_choices is not None:
        # A choice the checkpoint does not record is newer than the lowtune that wrote it, which knew one way only:
        # the way its settings (compared above, defaults filled in) still give.
        recorded = _flatten(saved_choices)
        changes += [
            f"resolved {key}: {before!r} -> {after!r} (decided for this machine)"
            for key, (before, after) in _differences(saved_choices, resolved.choices()).items()
            if key not in RESOLVED_MAY_CHANGE and key in recorded
        ]
    fingerprint_file = checkpoint / FINGERPRINT_FILE_NAME
    if fingerprint_file.is_file():
        before = json.loads(fingerprint_file.read_text(encoding="utf-8"))
        after = fingerprint(config, mixture)
        changes += [
            f"{name} changed since the checkpoint" for name in sorted(before) if before[name] != after.get(name)
        ]
    if changes and not force:
        raise UserError.one(
            "this is not the run the checkpoint belongs to:\n  " + "\n  ".join(changes),
            checkpoint,
            fix="resume with the checkpoint's own config, or pass --force to resume anyway",
        )


def fingerprint(config: RunConfig, mixture: str | None = None) -> dict[str, str]:
    """sha256 of each data file, of the model's config.json and of the records drawn from the files (a mixture's
    draw): what the config's paths alone do not pin down."""
    from lowtune.model.load import resolve_model_path

    entries = config.data.files + config.data.eval_files
    files = {f"data file {entry}": resolve_data_path(entry.path) for entry in entries}
    files["model config.json"] = resolve_model_path(config.model.path) / "config.json"
    digests = {name: _sha256(path) for name, path in files.items()}
    return digests | ({"data mixture (the records drawn)": mixture} if mixture is not None else {})


def _sha256(path: Path) -> str:
    """Of a file, or of a folder (datasets' save_to_disk): each file's relative name and bytes, in name order."""
    if path.is_file():
        return file_digest(path)  # in chunks, and once per process for a file that has not changed
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def save_fingerprint(config: RunConfig, folder: Path, mixture: str | None = None) -> None:
    text = json.dumps(fingerprint(config, mixture), indent=2)
    (folder / FINGERPRINT_FILE_NAME).write_text(text, encoding="utf-8")


def remove_staging(output_dir: Path) -> None:
    """Half-written checkpoints of a process that was killed while saving."""
    for staging in output_dir.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(staging, ignore_errors=True)


def _differences(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    flat_before, flat_after = _flatten(before), _flatten(after)
    return {
        key: (flat_before.get(key), flat_after.get(key))
        for key in sorted(set(flat_before) | set(flat_after))
        if flat_before.get(key) != flat_after.get(key)
    }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
