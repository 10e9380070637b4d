"""Data files to records: JSON, JSONL, CSV and TSV here, Parquet and datasets folders in `columnar.py`.

Each reader yields (number, record), the number being what a user finds the record by: the line for JSON and JSONL;
for CSV and TSV the row as a spreadsheet shows it (the header is row 1, the first record row 2, a quoted cell over
several lines is still one row); for Parquet and datasets folders the record's position, from 1.

JSONL, CSV and TSV are read a line at a time and Parquet a batch at a time, so a multi-GB file takes little memory
(files of `progress.LARGE_FILE_BYTES` or more show a progress bar); a JSON array is read whole. Lines end in \n,
\r\n or a lone \r.
"""

from __future__ import annotations

import codecs
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
from lowtune.data.progress import read_progress
from lowtune.errors import UserError

log = logging.getLogger(__name__)
SUFFIX_TYPES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
SUFFIX_TYPES |= {".pq": "parquet", ".tab": "tsv"}
MISSING_FIX = "check data.files in the config or --data"
CHUNK_BYTES = 1 << 20
PROGRESS_EVERY = 8192  # lines between two updates of the progress bar


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
    first = _first_character(path)
    if first is None:
        raise UserError.one("data file is empty", path, fix="give a JSON array or one JSON object per line")
    if first == b"[":
        yield from _json_array_records(_decode(path.read_bytes(), path), path)
    else:
        yield from _jsonl_records(path)


def _first_character(path: Path) -> bytes | None:
    """The first byte that is not white space (after a UTF-8 byte order mark), or None for a blank file."""
    with path.open("rb") as stream:
        head = stream.read(len(codecs.BOM_UTF8))
        head = head.removeprefix(codecs.BOM_UTF8)
        while head or (head := stream.read(CHUNK_BYTES)):
            text = head.lstrip()
            if text:
                return text[:1]
            head = b""
    return None


def _lines(path: Path, newline: str | None) -> Iterator[str]:
    """The file's lines, read as it goes; `newline` as `open` takes it (None: \n, \r\n and \r end a line)."""
    with path.open("rb") as raw, read_progress(path, path.stat().st_size, "bytes") as progress:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline=newline)
        try:
            for count, line in enumerate(text, start=1):
                if count % PROGRESS_EVERY == 0:
                    progress(raw.tell())
                yield line
        except UnicodeDecodeError:
            raise _not_utf8(path) from None


def _not_utf8(path: Path) -> UserError:
    """The error for the first byte of `path` that is not UTF-8, located by line (read again, a chunk at a time)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            pending = len(decoder.getstate()[0])  # bytes of a character the last chunk cut in two
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                data = error.object
                position = offset - pending + error.start
                line = lines + data[: error.start].count(b"\n") + 1
                found = data[error.start : error.start + 1]
                return UserError.one(
                    f"not UTF-8 text (byte {position}: {found!r})", path, line, fix="save the file as UTF-8"
                )
            offset += len(chunk)
            lines += chunk.count(b"\n")
    return UserError.one("not UTF-8 text", path, fix="save the file as UTF-8")


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
    rows = csv.reader(_lines(path, newline=""), delimiter=delimiter, strict=True)
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


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(_lines(path, newline=None), start=1):
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
