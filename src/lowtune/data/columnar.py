"""Parquet files and folders written by `datasets`' save_to_disk: pyarrow and datasets, imported only here and only
when such a file is read (`pip install "lowtune[data]"`).

Records are numbered by position from 1. A DatasetDict folder is read through its train split.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from lowtune.data.progress import read_progress
from lowtune.errors import UserError

log = logging.getLogger(__name__)
BATCH_RECORDS = 1024
INSTALL_FIX = 'pip install "lowtune[data]"'
DATASETS_FIX = "give the folder that datasets' save_to_disk wrote (it holds state.json or dataset_dict.json)"


def parquet_records(path: Path, columns: Mapping[str, str]) -> Iterator[tuple[int, Any]]:
    """(position, row as a dict) of a Parquet file, a batch of rows at a time (bounded memory for any size)."""
    pyarrow = _need("pyarrow", path, "Parquet")
    parquet = _need("pyarrow.parquet", path, "Parquet")
    # What pyarrow raises for a file that is not Parquet or is damaged (text in it that is not UTF-8: ValueError).
    unreadable = (pyarrow.ArrowException, OSError, ValueError)
    try:
        table = parquet.ParquetFile(path)
    except unreadable as error:
        raise UserError.one(
            f"not a Parquet file ({_first_line(error)})",
            path,
            fix="write it with pandas' to_parquet or pyarrow.parquet.write_table, or name it for what it holds",
        ) from None
    check_columns(path, table.schema_arrow.names, columns)
    number = 0
    try:
        with read_progress(path, table.metadata.num_rows, "rows") as progress:
            for batch in table.iter_batches(batch_size=BATCH_RECORDS):
                for record in batch.to_pylist():
                    number += 1
                    yield number, record
                progress(number)
    except unreadable as error:
        raise UserError.one(
            f"unreadable Parquet data after {number} records ({_first_line(error)})",
            path,
            fix="write the file again: it is damaged or cut short",
        ) from None


def datasets_records(path: Path, columns: Mapping[str, str]) -> Iterator[tuple[int, Any]]:
    """(position, row as a dict) of a save_to_disk folder: a Dataset, or a DatasetDict's train split."""
    folder = dataset_folder(path)
    datasets = _need("datasets", path, "a datasets folder")
    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as error:  # datasets raises many kinds for a folder that is not its own
        raise UserError.one(
            f"not a folder datasets can load ({type(error).__name__}: {_first_line(error)})", folder, fix=DATASETS_FIX
        ) from None
    if not isinstance(dataset, datasets.Dataset):
        raise UserError.one(f"not one data set but {type(dataset).__name__}", folder, fix=DATASETS_FIX)
    check_columns(folder, dataset.column_names, columns)
    yield from enumerate(dataset, start=1)


def dataset_folder(path: Path) -> Path:
    """The folder of the records: `path`, or its train split where `path` holds a DatasetDict (which is logged)."""
    if not path.is_dir():
        raise UserError.one("data folder not found", path, fix="check data.files in the config or --data")
    dict_file = path / "dataset_dict.json"
    if not dict_file.is_file():
        return path
    try:
        splits = json.loads(dict_file.read_text(encoding="utf-8"))["splits"]
        splits = [str(split) for split in splits]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError.one("dataset_dict.json does not list the splits", dict_file, fix=DATASETS_FIX) from None
    if "train" not in splits:
        raise UserError.one(
            f"a DatasetDict with no train split (its splits: {', '.join(splits) or 'none'})",
            path,
            fix=f"give the folder of the split to read, e.g. {path / splits[0]}" if splits else DATASETS_FIX,
        )
    log.info("%s holds a DatasetDict (splits: %s): reading its train split", path, ", ".join(splits))
    return path / "train"


def check_columns(path: Path, present: list[str], columns: Mapping[str, str]) -> None:
    """Every column the mapping names must be in the file (one message for the file, not one a record)."""
    missing = [f"{theirs!r} (mapped to {canonical})" for canonical, theirs in columns.items() if theirs not in present]
    if missing:
        raise UserError.one(
            f"no column {', '.join(missing)} in the file; its columns: {', '.join(map(str, present)) or 'none'}",
            path,
            fix="correct data.files columns to name the file's columns",
        )


def _need(module: str, path: Path, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError.one(
            f"reading {what} needs {module.split('.')[0]}, which is not installed", path, fix=INSTALL_FIX
        ) from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
