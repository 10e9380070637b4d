"""What `lowtune train` and `lowtune plan` check before torch or transformers is imported: the output folder, every
record's structure in every data file (the held-out split and the mixture's draw included), and a model folder given
by path.

A user error found here prints within about a second: this module and what it imports (config, data reading, the
split, the mixture) need neither torch nor transformers. The records are validated as they are read and not kept (a
multi-GB file takes little memory); encoding them needs the tokenizer and comes after (`recipe.prepare`, through
`data/run_data.prepare_data`, which reads the files again, a batch at a time, or their encoded set from the cache).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from lowtune.config import CONFIG_FILE_NAME, RunConfig, load_run_config
from lowtune.data.preference import check_pair_files
from lowtune.data.read import check_files_exist, check_records
from lowtune.data.split import held_out_count
from lowtune.data.templates import input_separator
from lowtune.errors import UserError
from lowtune.model.default import resolve_model_path


@dataclass(frozen=True)
class CheckedData:
    """A run's records, validated: how many are drawn from data.files (held-out ones included), how many held out."""

    records: int
    held_out: int


def check_before_loading(config: RunConfig, overwrite: bool = False, check_output: bool = True) -> CheckedData:
    """Checks the output folder (unless `check_output` is false, as for `lowtune plan`) and reads and validates every
    record; raises UserError with every problem found."""
    check_paths(config, overwrite, check_output)
    data = config.data
    separator = input_separator(data.template)
    check = (
        partial(check_records, fmt=data.format, input_separator=separator)
        if config.train.method == "sft"
        else check_pair_files
    )
    records = check(data.files, seed=config.train.seed)
    if data.eval_files:
        held_out = check(data.eval_files, seed=config.train.seed)
    else:
        held_out = held_out_count(records, data.val_size, warn=False)  # a count leaving none to train on: an error
    if config.model.path:  # the embedded default (no path) is found, or converted, when the tokenizer loads
        resolve_model_path(config.model.path)
    return CheckedData(records, held_out)


def check_paths(config: RunConfig, overwrite: bool = False, check_output: bool = True) -> None:
    """The output folder (unless `check_output` is false) and that every data file is there (each missing one
    named): what `recipe.prepare` checks itself when no preflight ran (the Python API: `prepare_data` then validates
    the records as it encodes them, reading each file once)."""
    if check_output and int(os.environ.get("RANK", "0")) == 0:  # other processes would see the first one's files
        check_output_dir(Path(config.output_dir), overwrite)
    check_files_exist(config.data.files + config.data.eval_files)
    if config.train.init_adapter:
        check_init_adapter(config)


def check_init_adapter(config: RunConfig) -> None:
    """train.init_adapter is a run folder whose lora settings are this run's (its adapter then fits the layers)."""
    folder = Path(config.train.init_adapter)
    if not (folder / CONFIG_FILE_NAME).is_file():
        raise UserError.one(
            "train.init_adapter is not a lowtune run folder (no lowtune.yaml)",
            folder,
            fix="give the folder of a run or checkpoint that lowtune train wrote",
        )
    theirs = load_run_config(folder).lora
    if theirs != config.lora:
        raise UserError.one(
            f"train.init_adapter was trained with lora {theirs.model_dump()}, this run says {config.lora.model_dump()}",
            folder,
            fix="give this run the adapter's lora settings",
        )


def check_output_dir(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UserError.one("output_dir exists and is not a folder", output)
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError.one(
            "output_dir already holds a run",
            output,
            fix="choose another --output-dir, or pass --overwrite to replace it",
        )
