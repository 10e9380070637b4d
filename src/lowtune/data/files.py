"""Data files to records: JSON, JSONL, CSV and TSV here, Parquet and datasets folders in `columnar.py`.

Each reader yields (number, record), the number being what a user finds the record by: the line for JSON and JSONL;
for CSV and TSV the row as a spreadsheet shows it (the header is row 1, the first record row 2, a quoted cell over
several lines is still one row); for Parquet and datasets folders the record's position, from 1.

The whole file is read at once (JSON, JSONL, CSV) or a batch at a time (Parquet). Hook for large files (issue 16):
these iterators are the place for a streaming pass; nothing downstream needs the file whole.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lowtune.config import FileType
from lowtune.data import columnar
from lowtune.data.columnar import check_columns
from lowtune.data.formats import TURN_KEYS
from lowtune.errors import UserError

log = logging.getLogger(__name__)
SUFFIX_TYPES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
SUFFIX_TYPES |= {".pq": "parquet", ".tab": "tsv"}
MISSING_FIX = "check data.files in the config or --data"


def file_type(path: Path, stated: FileType = "auto") -> FileType:
    """The stated type, else the folder layout (a save_to_disk folder), else the extension; JSON(L) otherwise."""
    if stated != "auto":
        return stated
    if path.is_dir():
        return "datasets"
    return SUFFIX_TYPES.get(path.suffix.lower(), "json")  # any other name: JSON or JSON lines, told by the content


def records_folder(path: Path, stated: FileType = "auto") -> Path:
    """Where the records of `path` are, so that messages name it: the file itself, or a DatasetDict's train split."""
    return columnar.dataset_folder(path) if file_type(path, stated) == "datasets" else path


def read_file_records(
    path: Path, stated: FileType = "auto", columns: Mapping[str, str] | None = None
) -> Iterator[tuple[int, Any]]:
    """Yields (number, record) of any supported file; `columns` (canonical: the file's name) are checked against
    a columnar file's header before any record is read."""
    kind = file_type(path, stated)
    mapped = {canonical: theirs for canonical, theirs in (columns or {}).items() if canonical not in TURN_KEYS}
    if kind == "datasets":
        yield from columnar.datasets_records(path, mapped)
        return
    if not path.is_file():
        raise UserError.one("data file not found", path, fix=MISSING_FIX)
    if kind == "parquet":
        yield from columnar.parquet_records(path, mapped)
    elif kind in ("csv", "tsv"):
        yield from _delimited_records(path, "\t" if kind == "tsv" else ",", mapped)
    else:
        yield from json_records(path)


def json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, parsed JSON value) for each record of a .json array or a .jsonl file."""
    if not path.is_file():
        raise UserError.one("data file not found", path, fix=MISSING_FIX)
    text = _decode(path.read_bytes(), path)
    if not text.strip():
        raise UserError.one("data file is empty", path, fix="give a JSON array or one JSON object per line")
    if text.lstrip().startswith("["):
        yield from _json_array_records(text, path)
    else:
        yield from _jsonl_records(text, path)


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UserError.one(
            f"not UTF-8 text (byte {error.start}: {raw[error.start : error.start + 1]!r})",
            path,
            line,
            fix="save the file as UTF-8",
        ) from None


def _delimited_records(path: Path, delimiter: str, columns: Mapping[str, str]) -> Iterator[tuple[int, Any]]:
    """CSV or TSV with a header row: one record (column: text) a row, numbered as a spreadsheet shows it."""
    name = "tab" if delimiter == "\t" else "comma"
    text = _decode(path.read_bytes(), path)
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    row, header = 0, None
    try:
        for row, cells in enumerate(rows, start=1):  # row: also where a csv.Error stops
            if not any(cell.strip() for cell in cells):
                continue  # a blank row, as JSONL skips blank lines
            if header is None:
                header = _header(cells, path, row)
                check_columns(path, header, columns)
            elif len(cells) != len(header):
                raise UserError.one(
                    f"{len(cells)} cells in this row, {len(header)} in the header",
                    path,
                    row,
                    fix=f'quote a cell that holds a {name} ("a{delimiter} b"), or check the delimiter',
                )
            else:
                yield row, dict(zip(header, cells, strict=True))
    except csv.Error as error:
        raise UserError.one(
            f"not valid {'TSV' if delimiter == chr(9) else 'CSV'}: {error}",
            path,
            row + 1,
            fix='quote a cell that holds quotes, line breaks or the delimiter, and double its quotes ("say ""hi""")',
        ) from None
    if header is None:
        raise UserError.one("data file is empty", path, fix="give a header row, then one record a row")


def _header(cells: list[str], path: Path, row: int) -> list[str]:
    names = [cell.strip() for cell in cells]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice or not all(names):
        problem = f"names {', '.join(map(repr, twice))} twice" if twice else "has an empty name"
        raise UserError.one(f"the header row {problem}", path, row, fix="give every column its own name")
    return names


def _jsonl_records(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError.one(
                f"not valid JSON: {error.msg} (column {error.colno})",
                path,
                number,
                fix="each line of a .jsonl file must be one complete JSON object",
            ) from None


def _json_array_records(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Walks a top-level JSON array element by element, so that each record keeps its line number."""
    decoder = json.JSONDecoder()
    position = _skip_space(text, text.index("[") + 1)
    closed = text.startswith("]", position)
    while not closed:
        line = _line_at(text, position)
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise UserError.one(
                f"not valid JSON: {error.msg}",
                path,
                error.lineno,
                fix="check the quotes, commas and brackets around that line",
            ) from None
        yield line, value
        position = _skip_space(text, position)
        if text.startswith(",", position):
            position = _skip_space(text, position + 1)
        elif text.startswith("]", position):
            closed = True
        else:
            found = repr(text[position]) if position < len(text) else "the end of the file"
            raise UserError.one(
                f"expected ',' or ']' after a record, found {found}",
                path,
                _line_at(text, position),
                fix="separate the records of a JSON array with commas",
            )
    if text[position + 1 :].strip():
        raise UserError.one(
            "unexpected text after the closing ']'",
            path,
            _line_at(text, position + 1),
            fix="a .json file holds one array; use .jsonl for one record a line",
        )


def _line_at(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
