"""What `lowtune train` and `lowtune plan` check before torch or transformers is imported: the output folder, every
record's structure in every data file (the held-out split included), and a model folder given by path.

A user error found here prints within about a second: this module and what it imports (config, data reading, the
split) need neither torch nor transformers. Encoding the records needs the tokenizer and comes after
(`recipe.prepare`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lowtune.config import RunConfig
from lowtune.data.read import Example, read_examples
from lowtune.data.split import split_for_run
from lowtune.data.templates import input_separator
from lowtune.errors import UserError
from lowtune.model.default import resolve_model_path


@dataclass(frozen=True)
class Records:
    """A run's records, read and validated: all of them, and the split training makes of them."""

    examples: list[Example]
    train: list[Example]
    held_out: list[Example]


def check_before_loading(config: RunConfig, overwrite: bool = False, check_output: bool = True) -> Records:
    """Checks the output folder (unless `check_output` is false, as for `lowtune plan`) and reads and validates every
    record; raises UserError with every problem found."""
    if check_output and int(os.environ.get("RANK", "0")) == 0:  # other processes would see the first one's files
        check_output_dir(Path(config.output_dir), overwrite)
    examples = read_examples(config.data.files, config.data.format, input_separator(config.data.template))
    train, held_out = split_for_run(config, examples)
    if config.model.path:  # the embedded default (no path) is found, or converted, when the tokenizer loads
        resolve_model_path(config.model.path)
    return Records(examples, train, held_out)


def check_output_dir(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UserError.one("output_dir exists and is not a folder", output)
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError.one(
            "output_dir already holds a run",
            output,
            fix="choose another --output-dir, or pass --overwrite to replace it",
        )
