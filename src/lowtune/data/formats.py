"""Records to conversations: the alpaca, chat and sharegpt formats, under a file's own column and role names.

A record is a dict (a JSON object, a CSV row, a Parquet or datasets row). Its messages come out validated, or a
`RecordError` says what is wrong and how to fix it; the caller adds the file and the line.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lowtune.config import RecordFormat

ROLES = ("system", "user", "assistant")
# ShareGPT speakers: LLaMA-Factory's defaults (human, gpt, system), the role names axolotl also accepts (user,
# assistant), and the assistant names of the original ShareGPT dumps (chatgpt, bing, bard).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
# Tool use (LLaMA-Factory's function_call and observation, OpenAI's tool and function, Llama 3's ipython): lowtune
# trains plain conversations, so a record with such a turn is refused rather than trained wrongly.
TOOL_ROLES = ("tool", "function", "function_call", "observation", "ipython")
HISTORY_FIX = 'write history as [["user turn", "assistant turn"], ...]'
MESSAGES_FIX = 'write messages as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
SHAREGPT_FIX = 'write conversations as [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]'
TOOLS_FIX = "lowtune trains plain conversations: drop the tool turns (or the records that have them)"
TURN_KEYS = ("role", "content", "from", "value")  # mapped inside each message, not at the record's top level


@dataclass(frozen=True)
class Message:
    role: str
    content: str


class RecordError(Exception):
    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message, self.fix = message, fix


@dataclass(frozen=True)
class _Fields:
    """A record under the canonical field names, each problem named by the file's own name."""

    values: dict[str, Any]
    columns: Mapping[str, str]

    @classmethod
    def of(cls, record: dict[str, Any], columns: Mapping[str, str]) -> _Fields:
        values = {key: value for key, value in record.items() if key not in columns}
        for canonical, theirs in columns.items():
            if canonical not in TURN_KEYS and theirs in record:
                values[canonical] = record[theirs]
        return cls(values, columns)

    def name(self, key: str) -> str:
        theirs = self.columns.get(key)
        return repr(key) if theirs is None else f"{theirs!r} (mapped to {key})"

    def string(self, key: str, default: Any = ...) -> Any:
        value = self.values.get(key)
        if value is None:
            if default is ...:
                raise RecordError(f"missing field {self.name(key)}", self._missing_fix(key))
            return default
        if not isinstance(value, str):
            raise RecordError(f"field {self.name(key)} must be a string, found {type(value).__name__}", "write text")
        return value

    def _missing_fix(self, key: str) -> str:
        if key in self.columns:
            return f"add the column {self.columns[key]!r}, or map {key} to another in data.files columns"
        return _did_you_mean(self.values, (key,)) or f"add {key!r} (or map it in data.files columns)"


def to_messages(
    record: Any,
    fmt: RecordFormat,
    input_separator: str,
    columns: Mapping[str, str] | None = None,
    roles: Mapping[str, str] | None = None,
) -> list[Message]:
    """The conversation of one record in `fmt` (auto: detected from its keys), validated."""
    if not isinstance(record, dict):
        raise RecordError(
            f"a record must be a JSON object, found {type(record).__name__}",
            'write {"instruction": ..., "output": ...}, {"messages": [...]} or {"conversations": [...]}',
        )
    fields = _Fields.of(record, columns or {})
    record_format = fmt if fmt != "auto" else _detect_format(fields.values)
    if record_format == "alpaca":
        return _alpaca_messages(fields, input_separator)
    if record_format == "chat":
        return _conversation(fields, "messages", ("role", "content"), dict(zip(ROLES, ROLES, strict=True)), roles)
    messages = _conversation(fields, "conversations", ("from", "value"), SHAREGPT_ROLES, roles)
    return _with_system_field(fields, messages)


def _detect_format(record: dict[str, Any]) -> RecordFormat:
    if "chosen" in record and "rejected" in record:
        raise RecordError(
            "a preference record (chosen, rejected) in a supervised run (train.method: sft)",
            "set train.method: dpo or orpo to train on preference pairs, or give SFT records",
        )
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    keys = ", ".join(sorted(map(str, record))) or "none"
    hint = _did_you_mean(record, ("messages", "conversations", "instruction", "output"))
    raise RecordError(
        f"cannot tell the record's format (keys: {keys})",
        hint
        or "alpaca records need instruction and output, chat records messages, sharegpt records conversations; "
        "other names: map them in data.files columns",
    )


def _alpaca_messages(fields: _Fields, input_separator: str) -> list[Message]:
    instruction = fields.string("instruction")
    output = fields.string("output")
    extra_input = fields.string("input", default="")
    system = fields.string("system", default=None)
    if not output.strip():
        raise RecordError(f"empty {fields.name('output')}: the record has nothing to train on", "fill it or drop it")
    user = input_separator.join(part for part in (instruction, extra_input) if part)
    if not user.strip():
        raise RecordError("empty prompt: 'instruction' and 'input' are both empty", "write the prompt in 'instruction'")
    history = fields.values.get("history") or []
    if not isinstance(history, list):
        raise RecordError(f"{fields.name('history')} must be a list of [user, assistant] pairs", HISTORY_FIX)
    messages = [Message("system", system)] if system else []
    for turn, pair in enumerate(history):
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(text, str) for text in pair):
            raise RecordError(f"history[{turn}] must be a [user, assistant] pair of strings", HISTORY_FIX)
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    return messages + [Message("user", user), Message("assistant", output)]


def _conversation(
    fields: _Fields,
    list_key: str,
    keys: tuple[str, str],
    known_roles: Mapping[str, str],
    extra_roles: Mapping[str, str] | None,
) -> list[Message]:
    """chat's messages and sharegpt's conversations: a list of turns, each a role and a content under `keys`."""
    role_key, content_key = (fields.columns.get(key, key) for key in keys)
    names = dict(known_roles) | dict(extra_roles or {})
    fix = MESSAGES_FIX if list_key == "messages" else SHAREGPT_FIX
    raw = fields.values.get(list_key)
    if not isinstance(raw, list) or not raw:
        raise RecordError(f"{fields.name(list_key)} must be a non-empty list of {{{role_key}, {content_key}}}", fix)
    messages: list[Message] = []
    for index, item in enumerate(raw):
        where = f"{list_key}[{index}]"
        if not isinstance(item, dict):
            raise RecordError(f"{where} must be an object with {role_key} and {content_key}", fix)
        name, content = item.get(role_key), item.get(content_key)
        role = names.get(name) if isinstance(name, str) else None
        if role is None and name in TOOL_ROLES:
            raise RecordError(f"{where}: {name!r} turns (tool use) are not supported", TOOLS_FIX)
        if role is None:
            known = ", ".join(names)
            raise RecordError(f"{where}: unknown role {name!r}", f"roles are {known}; name others in data.files roles")
        if not isinstance(content, str):
            raise RecordError(f"{where}: {content_key} must be a string", "write it as text")
        if role == "system" and index != 0:
            raise RecordError(f"{where}: a system message may only come first", "move it to the start")
        messages.append(Message(role, content))
    check_turn_order(messages)
    return messages


def _with_system_field(fields: _Fields, messages: list[Message]) -> list[Message]:
    """sharegpt records may carry the system prompt beside the turns (LLaMA-Factory's system column)."""
    if fields.values.get("tools"):
        raise RecordError("'tools' (tool descriptions) are not supported", TOOLS_FIX)
    system = fields.string("system", default=None)
    if not system:
        return messages
    if messages[0].role == "system":
        raise RecordError(f"two system prompts: {fields.name('system')} and a system turn", "keep one of them")
    return [Message("system", system), *messages]


def check_turn_order(messages: list[Message]) -> None:
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


def _did_you_mean(record: dict[str, Any], wanted: tuple[str, ...]) -> str | None:
    keys = [key for key in record if isinstance(key, str)]
    for key in wanted:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.7)
        if close:
            return f"did you mean {key!r} instead of {close[0]!r}?"
    return None
