"""Interactive chat and batch generation on top of `ChatModel`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from rich.console import Console

from lowtune.data.read import Message, read_records
from lowtune.errors import UserError
from lowtune.infer.session import ChatModel, GenerationSettings

HELP = "/reset clears the history, /system TEXT sets the system prompt (and resets), /exit quits"


class Conversation:
    """The history of one chat: a system prompt plus alternating user and assistant messages."""

    def __init__(self, system: str | None):
        self.system = system
        self.turns: list[Message] = []

    def messages(self, user_text: str) -> list[Message]:
        head = [Message("system", self.system)] if self.system is not None else []
        return head + self.turns + [Message("user", user_text)]

    def add(self, user_text: str, reply: str) -> None:
        self.turns += [Message("user", user_text), Message("assistant", reply)]

    def reset(self, system: str | None = None) -> None:
        self.turns = []
        if system is not None:
            self.system = system


def chat_loop(
    chat_model: ChatModel,
    settings: GenerationSettings,
    system: str | None,
    read_line: Callable[[str], str] = input,
    console: Console | None = None,
) -> None:
    """Reads user lines until /exit or end of input; replies are streamed as they are generated."""
    console = console or Console()
    conversation = Conversation(system)
    shown = system if system is not None else chat_model.default_system
    console.print(f"[dim]{HELP}. System prompt: {shown!r}[/]")
    while True:
        try:
            line = read_line("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            conversation.reset()
            console.print("[dim]history cleared[/]")
            continue
        if line.startswith("/system"):
            conversation.reset(line[len("/system") :].strip())
            console.print(f"[dim]system prompt set, history cleared: {conversation.system!r}[/]")
            continue
        if line.startswith("/"):
            console.print(f"[dim]unknown command. {HELP}[/]")
            continue
        console.print("[bold]bot>[/] ", end="")
        reply = ""
        for piece in chat_model.stream(conversation.messages(line), settings):
            reply += piece
            console.print(piece, end="", markup=False, highlight=False)
        console.print()
        conversation.add(line, reply)


def read_prompts(path: Path) -> list[tuple[str, str | None]]:
    """(prompt, system) pairs from a JSONL file of {"prompt": ...[, "system": ...]} objects or plain strings."""
    prompts = []
    for line, record in read_records(path):
        if isinstance(record, str):
            prompts.append((record, None))
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append((record["prompt"], record.get("system")))
        else:
            raise UserError.one('each line must be a JSON string or {"prompt": ..., "system": ...}', path, line)
    return prompts


def generate_all(
    chat_model: ChatModel,
    prompts: Iterable[tuple[str, str | None]],
    settings: GenerationSettings,
    default_system: str | None,
) -> Iterable[str]:
    """One JSON line per prompt: {"prompt", "response"}."""
    for prompt, system in prompts:
        conversation = Conversation(system if system is not None else default_system)
        reply = chat_model.reply(conversation.messages(prompt), settings)
        yield json.dumps({"prompt": prompt, "response": reply}, ensure_ascii=False)
