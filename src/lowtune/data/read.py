"""Read and validate training records: alpaca JSON/JSONL and chat JSONL, every record checked before any model loads.

Every record becomes an `Example`: a list of role/content messages plus where it came from (file:line), so that
anything that goes wrong later can still point at the user's line.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from lowtune.config import BUILTIN_DATA_PREFIX
from lowtune.errors import Problem, UserError

Format = Literal["auto", "alpaca", "chat"]
ROLES = ("system", "user", "assistant")
MAX_REPORTED_PROBLEMS = 20
BUILTIN_DATASETS = {"huanhuan": "huanhuan.json"}
HISTORY_FIX = 'write history as [["user turn", "assistant turn"], ...]'
MESSAGES_FIX = 'write messages as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One training conversation; the replies of its assistant messages are what the model learns."""

    messages: tuple[Message, ...]
    source: str

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages[0].role == "system" else None


def resolve_data_path(name: str) -> Path:
    """Maps `builtin:NAME` onto the copy shipped inside the package; other names are plain paths."""
    if not name.startswith(BUILTIN_DATA_PREFIX):
        return Path(name)
    key = name[len(BUILTIN_DATA_PREFIX) :]
    if key not in BUILTIN_DATASETS:
        raise UserError.one(
            f"unknown built-in data set {name!r}",
            fix="built-in sets: " + ", ".join(BUILTIN_DATA_PREFIX + k for k in BUILTIN_DATASETS),
        )
    return Path(str(resources.files("lowtune.data") / "resources" / BUILTIN_DATASETS[key]))


def read_examples(files: list[str], fmt: Format = "auto", input_separator: str = "\n") -> list[Example]:
    """Reads and validates every record of every file; raises one UserError listing all problems found.

    Args:
        files: paths, or `builtin:NAME` for a bundled set.
        fmt: alpaca, chat, or auto (detected per file from its first record).
        input_separator: how an alpaca record's `instruction` and non-empty `input` are joined into the user turn.
    """
    examples: list[Example] = []
    problems: list[Problem] = []
    for name in files:
        path = resolve_data_path(name)
        for line, record in _records_with_lines(path):
            try:
                examples.append(to_example(record, fmt, f"{path}:{line}", input_separator))
            except RecordError as error:
                problems.append(Problem(error.message, path, line, error.fix))
            if len(problems) >= MAX_REPORTED_PROBLEMS:
                problems.append(Problem(f"stopped after {MAX_REPORTED_PROBLEMS} problems", path))
                raise UserError(problems)
    if problems:
        raise UserError(problems)
    if not examples:
        raise UserError.one("no training records in " + ", ".join(files), fix="give at least one record")
    return examples


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yields (line, parsed JSON value) for each record of a .json array or a .jsonl file."""
    yield from _records_with_lines(Path(path))


class RecordError(Exception):
    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message, self.fix = message, fix


def _records_with_lines(path: Path) -> Iterator[tuple[int, Any]]:
    if not path.is_file():
        raise UserError.one("data file not found", path, fix="check data.files in the config or --data")
    raw = path.read_bytes()
    text = _decode(raw, path)
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


def to_example(record: Any, fmt: Format, source: str, input_separator: str) -> Example:
    if not isinstance(record, dict):
        raise RecordError(
            f"a record must be a JSON object, found {type(record).__name__}",
            'write {"instruction": ..., "output": ...} or {"messages": [...]}',
        )
    record_format = fmt if fmt != "auto" else _detect_format(record)
    messages = _chat_messages(record) if record_format == "chat" else _alpaca_messages(record, input_separator)
    return Example(tuple(messages), source)


def _detect_format(record: dict[str, Any]) -> Format:
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    keys = ", ".join(sorted(record)) or "none"
    hint = _did_you_mean(record, ("messages", "instruction", "output"))
    raise RecordError(
        f"cannot tell the record's format (keys: {keys})",
        hint or "alpaca records need instruction and output; chat records need messages",
    )


def _alpaca_messages(record: dict[str, Any], input_separator: str) -> list[Message]:
    for key in ("instruction", "output"):
        if key not in record:
            raise RecordError(f"missing field {key!r}", _did_you_mean(record, (key,)) or f"add {key!r}")
    instruction = _string_field(record, "instruction")
    extra_input = _string_field(record, "input", default="")
    output = _string_field(record, "output")
    system = _string_field(record, "system", default=None)
    if not output.strip():
        raise RecordError("empty 'output': the record has nothing to train on", "remove the record or fill it")
    user = input_separator.join(part for part in (instruction, extra_input) if part)
    if not user.strip():
        raise RecordError("empty prompt: 'instruction' and 'input' are both empty", "write the prompt in 'instruction'")
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError("'history' must be a list of [user, assistant] pairs", HISTORY_FIX)
    messages = [Message("system", system)] if system else []
    for turn, pair in enumerate(history):
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(text, str) for text in pair):
            raise RecordError(f"history[{turn}] must be a [user, assistant] pair of strings", HISTORY_FIX)
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    return messages + [Message("user", user), Message("assistant", output)]


def _chat_messages(record: dict[str, Any]) -> list[Message]:
    raw = record.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RecordError("'messages' must be a non-empty list of {role, content} objects", MESSAGES_FIX)
    messages: list[Message] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RecordError(f"messages[{index}] must be an object with role and content", MESSAGES_FIX)
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise RecordError(f"messages[{index}]: unknown role {role!r}", "roles are " + ", ".join(ROLES))
        if not isinstance(content, str):
            raise RecordError(f"messages[{index}]: content must be a string", "write it as a JSON string")
        if role == "system" and index != 0:
            raise RecordError(f"messages[{index}]: a system message may only come first", "move it to the start")
        messages.append(Message(role, content))
    _check_turn_order(messages)
    return messages


def _check_turn_order(messages: list[Message]) -> None:
    turns = [m for m in messages if m.role != "system"]
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            raise RecordError(
                f"turn {index + 1} is from {message.role!r}, expected {expected!r}",
                "user and assistant turns must alternate, starting with the user",
            )
    if not turns or turns[-1].role != "assistant":
        raise RecordError("the last message must be the assistant's reply", "end each record with its reply")
    if not any(m.content.strip() for m in turns if m.role == "assistant"):
        raise RecordError("every assistant reply is empty: nothing to train on", "fill the replies or drop the record")


def _string_field(record: dict[str, Any], key: str, default: Any = ...) -> Any:
    if key not in record or record[key] is None:
        if default is ...:
            raise RecordError(f"missing field {key!r}", f"add {key!r}")
        return default
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, found {type(value).__name__}", "write it as a JSON string")
    return value


def _did_you_mean(record: dict[str, Any], wanted: tuple[str, ...]) -> str | None:
    for key in wanted:
        close = difflib.get_close_matches(key, list(record), n=1, cutoff=0.7)
        if close:
            return f"did you mean {key!r} instead of {close[0]!r}?"
    return None
