"""A folder that `ollama create` takes: the run's GGUF and a Modelfile that renders the run's chat format.

Ollama renders a chat through the Modelfile's TEMPLATE, a Go text/template that ranges over `.Messages` (each with
`.Role` and `.Content`; consecutive messages of one role are joined first). When a conversation does not begin with
a system message, Ollama puts the Modelfile's SYSTEM in front of it as one: lowtune's rule for the trained system
prompt. The template is derived from the chat format itself, not written per format: probe conversations whose
contents are markers give the text before and after each role's content (`OllamaTemplate.of`), and conversations
with other contents (spaces and newlines at their edges, every order of roles) must then render through the derived
template exactly as through the format, or the export is refused. The seed format, which strips the joined turns,
is the case of a last turn whose trailing whitespace is dropped.

Ollama's Modelfile strings have no escapes: a triple-quoted value ends at the first line break after three quotes
(spaces between), and characters Go does not print are dropped. Template text that holds a quote, a brace or such a
character is written as a Go string constant (`{{ "..." }}`); a system prompt or stop token that cannot be written is
refused. lowtune trains system, user and assistant turns only: messages of other roles (Ollama's tool) are left out.
"""

from __future__ import annotations

import copy
import logging
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from os.path import commonprefix
from pathlib import Path

from jinja2 import TemplateError

from lowtune.data.read import Message
from lowtune.data.templates import ChatFormat, load_chat_format
from lowtune.errors import Problem, UserError
from lowtune.export.gguf import export_gguf, source_problems, type_problems
from lowtune.export.merge import out_dir_problems, write_replacing
from lowtune.infer.session import GenerationSettings, base_model_settings, model_dir_chat_format
from lowtune.model.load import read_tokenizer, resolve_model_path

log = logging.getLogger(__name__)

GGUF_FILE, MODELFILE = "model.gguf", "Modelfile"
ROLES = ("system", "user", "assistant")
# Probes: every ordered pair of two roles once, system first (nothing is added before a system message), and each
# role last. Without a default system prompt, conversations that begin with a user message too (lowtune chat's and
# Ollama's: a conversation that begins with an assistant message is neither, and many templates refuse one).
CHAIN = ("system", "user", "assistant", "system", "assistant", "user", "system")
ENDINGS = (("system", "user"), ("system", "user", "assistant"))
# Contents that a template which trims, escapes or rewrites a message would render otherwise than it is given.
CHECKS = (
    (("system", " s \n"), ("user", "\nu1 "), ("assistant", "a1\n\n"), ("user", "  u2")),
    (("system", "s"), ("user", "u"), ("assistant", " a "), ("system", "\ts2\n"), ("assistant", "a2"), ("user", "u3\n")),
    (("system", "s "), ("user", "u"), ("assistant", "a\n"), ("user", "{{ .System }}"), ("system", '"""\n')),
)
CHECKS_WITHOUT_SYSTEM = ((("user", " u "), ("assistant", "a "), ("user", "\nu2")), (("user", "u\n"),))
# An Ollama model name: [namespace/]model[:tag] (Ollama's types/model/name.go)
NAME = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_-]*/)?[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?")


@dataclass(frozen=True)
class Turn:
    """How one role's message is rendered: prefix, content, suffix."""

    prefix: str
    suffix: str


@dataclass(frozen=True)
class OllamaTemplate:
    """A chat format as Ollama renders one: begin, each message as its role's turn, then the assistant's turn opened.

    Attributes:
        begin: text before the first message.
        turns: each role's prefix and suffix around the content.
        generation: text after the last message (the assistant's turn opened).
        strip_last: the last message's suffix loses its trailing whitespace (the seed format strips the turns).
        system: the system prompt put in front of a conversation that has none (Modelfile SYSTEM), if any.
    """

    begin: str
    turns: dict[str, Turn]
    generation: str
    strip_last: bool
    system: str | None

    @classmethod
    def of(cls, chat_format: ChatFormat) -> OllamaTemplate:
        """The template that renders `chat_format`'s prompts, checked on conversations it was not derived from.

        Raises:
            UserError: the format is not a concatenation of per-role turns (or its system prompt cannot be written).
        """
        probe = copy.copy(chat_format)
        probe.system = None  # Ollama adds SYSTEM itself: the format is probed without its own default
        chain = _pieces(probe, CHAIN)
        gaps = {(CHAIN[i], CHAIN[i + 1]): chain[i + 1] for i in range(len(CHAIN) - 1)}
        tails = {"system": chain[-1]} | {roles[-1]: _pieces(probe, roles)[-1] for roles in ENDINGS}
        system = chat_format.system
        if system is None:
            system = _template_system(probe, chain[0], gaps["system", "user"], tails["user"])
        if system == "":
            raise _inexpressible(chat_format, "it adds an empty system prompt, and Ollama only adds one that is not")
        leads = {"system": chain[0]}
        if system is None:
            leads["user"] = _pieces(probe, ("user",))[0]
        turns, begin = _turns(chat_format, gaps, leads)
        generation, strip_last = _generation(chat_format, turns, tails)
        template = cls(begin, turns, generation, strip_last, system)
        template._check(chat_format, probe)
        return template

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text that the Go template renders for `messages` (as Ollama passes them, system first)."""
        text = self.begin
        for index, message in enumerate(messages):
            turn = self.turns[message.role]
            last = index == len(messages) - 1
            text += turn.prefix + message.content + (turn.suffix.rstrip() if self.strip_last and last else turn.suffix)
        return text + self.generation

    def go_template(self) -> str:
        """The Modelfile's TEMPLATE: Go text/template over Ollama's `.Messages`, no whitespace of its own."""
        parts = [go_text(self.begin), "{{ range .Messages }}"]
        if self.strip_last:  # $last: no message after this one
            parts[1] = "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        for index, (role, turn) in enumerate(self.turns.items()):
            parts.append(f'{{{{ {"if" if index == 0 else "else if"} eq .Role "{role}" }}}}')
            parts += [go_text(turn.prefix), "{{ .Content }}", self._go_suffix(turn.suffix)]
        parts += ["{{ end }}{{ end }}", go_text(self.generation)]
        return "".join(parts)

    def _go_suffix(self, suffix: str) -> str:
        kept = suffix.rstrip() if self.strip_last else suffix
        dropped = suffix[len(kept) :]
        return go_text(kept) + (f"{{{{ if not $last }}}}{go_text(dropped)}{{{{ end }}}}" if dropped else "")

    def _check(self, chat_format: ChatFormat, probe: ChatFormat) -> None:
        checks = CHECKS + (CHECKS_WITHOUT_SYSTEM if self.system is None else ())
        for check in checks:
            messages = [Message(role, content) for role, content in check]
            expected, rendered = _render(probe, messages), self.render(messages)
            if rendered != expected:
                raise _inexpressible(
                    chat_format,
                    f"the turns found from probe conversations render {[m.content for m in messages]!r} as "
                    f"{rendered!r}, the format as {expected!r} (it trims, escapes or rewrites contents, or adds text "
                    "that depends on more than a message's role)",
                )


def export_ollama(
    out: str | Path,
    gguf_type: str = "q8_0",
    adapter: str | Path | None = None,
    model: str | Path | None = None,
    model_path: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Writes a folder for Ollama: `model.gguf` (the run's or model folder's GGUF) and a Modelfile; returns the
    commands that load and run it.

    The chat format is turned into a template, and refused if it cannot be, before any weight is loaded. The folder
    is written beside `out` and renamed when complete.

    Args:
        out: the folder to write; a non-empty one is replaced only with `overwrite`.
        gguf_type: the GGUF's type (`export_gguf`'s TYPES); q8_0 stays closest to the merged model among the small
            ones (docs/deploy.md).
        adapter: a lowtune run folder (or one of its checkpoints).
        model: a model folder instead (`lowtune merge`'s, or any Hugging Face folder of a family lowtune trains).
        model_path: the base model folder of `adapter`, when it moved since training.
        name: the model's name in Ollama (default: the run's or model folder's name).
        overwrite: replace a non-empty `out`.
    """
    out = Path(out)
    sources = [Path(folder) for folder in (adapter, model, model_path) if folder is not None]
    problems = type_problems(gguf_type) + source_problems(adapter, model) + out_dir_problems(out, overwrite, sources)
    name = name or _default_name(sources[0] if sources else out)
    if not NAME.fullmatch(name):
        problems.append(Problem(f"{name!r} is not an Ollama model name", fix="pass --name with letters, digits, _-."))
    if problems:
        raise UserError(problems)
    chat_format = _chat_format(adapter, model)
    modelfile = modelfile_text(OllamaTemplate.of(chat_format), stop_tokens(chat_format))

    def write(folder: Path) -> None:
        export_gguf(folder / GGUF_FILE, gguf_type, adapter=adapter, model=model, model_path=model_path)
        (folder / MODELFILE).write_text(modelfile, encoding="utf-8")

    write_replacing(out, write)
    commands = [f"ollama create {shlex.quote(name)} -f {shlex.quote(str(out / MODELFILE))}", f"ollama run {name}"]
    log.info("Wrote %s for Ollama: %s", out, " && ".join(commands))
    return commands


def modelfile_text(template: OllamaTemplate, stops: Sequence[str]) -> str:
    """The Modelfile: the GGUF beside it, the template, the trained system prompt, lowtune chat's decoding."""
    defaults = GenerationSettings()
    lines = [
        "# Written by lowtune export ollama: load it with `ollama create NAME -f Modelfile`.",
        f"FROM ./{GGUF_FILE}",
        f"TEMPLATE {modelfile_string(template.go_template(), 'the template')}",
    ]
    if template.system is not None:
        lines.append(f"SYSTEM {modelfile_string(template.system, 'the system prompt')}")
    lines += [
        "# lowtune chat decodes greedily and stops after its --max-new-tokens by default: the same answers here.",
        f"PARAMETER temperature {defaults.temperature:g}",
        f"PARAMETER num_predict {defaults.max_new_tokens}",
        "# Generation ends at the chat format's end of turn (and the tokenizer's end of text), as in lowtune chat.",
    ]
    lines += [f'PARAMETER stop "{_stop_value(stop)}"' for stop in stops]
    return "\n".join(lines) + "\n"


def stop_tokens(chat_format: ChatFormat) -> list[str]:
    """The format's stop tokens as text."""
    return chat_format.tokenizer.convert_ids_to_tokens(chat_format.stop_token_ids)


def go_text(text: str) -> str:
    """`text` as literal output of a Go template: as it is, or as a Go string constant when it holds what the
    template or the Modelfile would read otherwise (a brace, a quote, a character Go does not print)."""
    if not text or all(_printable(c) and c not in '{"' for c in text):
        return text
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    quoted = "".join(escapes.get(c) or (c if c.isprintable() else f"\\U{ord(c):08x}") for c in text)
    return f'{{{{ "{quoted}" }}}}'


def modelfile_string(value: str, what: str) -> str:
    """`value` as a triple-quoted Modelfile string; a value Ollama's parser would read otherwise is refused."""
    unprintable = sorted({c for c in value if not _printable(c)})
    if unprintable or re.search(r'"""[ \t]*[\r\n]', value):
        why = (
            f"characters Ollama drops ({', '.join(map(ascii, unprintable))})"
            if unprintable
            else "three quotes before a line break, which end it"
        )
        raise UserError.one(
            f"{what} cannot be written in a Modelfile: it holds {why}",
            fix="train with a system prompt without them (data.system), or edit the Modelfile by hand",
        )
    return f'"""{value}"""'


def _stop_value(stop: str) -> str:
    if '"' in stop or not all(c.isprintable() for c in stop):
        raise UserError.one(f"the stop token {stop!r} cannot be written as a Modelfile PARAMETER")
    return stop


def _printable(c: str) -> bool:
    """Kept by Ollama's Modelfile parser: what Go prints, and the whitespace of a line."""
    return c.isprintable() or c in "\t\n\r"


def _chat_format(adapter: str | Path | None, model: str | Path | None) -> ChatFormat:
    """The chat format of the run or model folder, read without its weights."""
    if adapter is not None:
        base_model_settings(Path(adapter))  # a folder that is not a run stops here, with the reason
        return load_chat_format(adapter, read_tokenizer(adapter))
    folder = resolve_model_path(model)
    return model_dir_chat_format(folder, read_tokenizer(folder))


def _default_name(source: Path) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", source.resolve().name.lower()).strip("-.") or "lowtune"


def _marker(index: int) -> str:
    return f"\u27e6{index}\u27e7"


def _render(chat_format: ChatFormat, messages: Sequence[Message]) -> str:
    try:
        segments = chat_format.segments(messages, generation_prompt=True)
    except (ValueError, TemplateError) as error:  # a model's template that refuses this order of roles
        roles = ", ".join(message.role for message in messages)
        raise _inexpressible(chat_format, f"it does not render a conversation of {roles} ({error})") from error
    return "".join(segment.text for segment in segments)


def _pieces(chat_format: ChatFormat, roles: Sequence[str]) -> list[str]:
    """The text before each message's content, and after the last, when messages of `roles` hold markers."""
    text = _render(chat_format, [Message(role, _marker(i)) for i, role in enumerate(roles)])
    pieces = []
    for index in range(len(roles)):
        before, found, text = text.partition(_marker(index))
        if not found:
            raise _inexpressible(chat_format, f"a {roles[index]} message's content is not in the prompt as written")
        pieces.append(before)
    return pieces + [text]


def _template_system(probe: ChatFormat, lead: str, system_to_user: str, user_tail: str) -> str | None:
    """The system prompt a format's own template adds to a conversation without one (SmolLM2's, Qwen's), if any."""
    text = _render(probe, [Message("user", _marker(0))])
    end = system_to_user + _marker(0) + user_tail
    if text.startswith(lead) and text.endswith(end) and len(text) >= len(lead) + len(end):
        return text[len(lead) : len(text) - len(end)]
    return None


def _turns(chat_format: ChatFormat, gaps: dict, leads: dict[str, str]) -> tuple[dict[str, Turn], str]:
    """Each role's prefix and suffix, and the text before the first message, from the text between contents.

    The text between two messages is one role's suffix and the next role's prefix. A prefix is at most what every
    text before that role's content ends with; each suffix is then at least what those prefixes leave of the texts
    after its role, which shortens the prefixes again, until both hold (the longest prefixes: a role's header is
    its prefix, not the previous suffix).
    """
    prefix_length = {
        role: len(_common_suffix([gap for (_, after), gap in gaps.items() if after == role] + [leads.get(role)]))
        for role in ROLES
    }
    while True:
        suffix_length = {
            role: max(len(gap) - prefix_length[after] for (before, after), gap in gaps.items() if before == role)
            for role in ROLES
        }
        shorter = {
            role: min(
                [prefix_length[role]]
                + [max(0, len(gap) - suffix_length[b]) for (b, a), gap in gaps.items() if a == role]
            )
            for role in ROLES
        }
        if shorter == prefix_length:
            break
        prefix_length = shorter
    suffixes = {(before, gap[: suffix_length[before]]) for (before, _), gap in gaps.items()}
    prefixes = {(after, gap[suffix_length[before] :]) for (before, after), gap in gaps.items()}
    if len(suffixes) != len(ROLES) or len(prefixes) != len(ROLES):
        raise _inexpressible(chat_format, "the text between two messages depends on both of their roles")
    turns = {role: Turn(dict(prefixes)[role], dict(suffixes)[role]) for role in ROLES}
    begins = {lead[: len(lead) - len(turns[role].prefix)] for role, lead in leads.items()}
    if len(begins) != 1 or not all(lead.endswith(turns[role].prefix) for role, lead in leads.items()):
        raise _inexpressible(chat_format, "the first message is rendered otherwise than the others")
    return turns, begins.pop()


def _generation(chat_format: ChatFormat, turns: dict[str, Turn], tails: dict[str, str]) -> tuple[str, bool]:
    """What follows the last message's suffix (the assistant's turn opened), and whether that suffix is stripped."""
    for strip_last in (False, True):
        kept = {role: turns[role].suffix.rstrip() if strip_last else turns[role].suffix for role in tails}
        if all(tail.startswith(kept[role]) for role, tail in tails.items()):
            generations = {tail[len(kept[role]) :] for role, tail in tails.items()}
            if len(generations) == 1:
                return generations.pop(), strip_last
    raise _inexpressible(chat_format, "the end of the prompt depends on the last message's role")


def _common_suffix(texts: list[str | None]) -> str:
    reversed_texts = [text[::-1] for text in texts if text is not None]
    return commonprefix(reversed_texts)[::-1]


def _inexpressible(chat_format: ChatFormat, why: str) -> UserError:
    return UserError.one(
        f"the {chat_format.name} chat format cannot be written as an Ollama template: {why}",
        fix="train with data.template: qwen, or serve the GGUF (lowtune export gguf) with llama.cpp, whose Jinja "
        "chat template lowtune writes into the file (llama-server -m FILE --jinja)",
    )
