"""Chat formats: how a conversation becomes tokens, and which of them the model learns.

A format turns messages into segments (text, trained or not) and tokenizes each segment on its own, which is how
the prompt is tokenized at inference too: training and chat see the same tokens. Only assistant replies and their
end-of-turn token are trained. The format is saved beside the adapter (`chat_format.json`) and chat reads it back.

Formats:
- `tokenizer`: the model's own Jinja chat template, split into turns by rendering growing prefixes of the
  conversation;
- `qwen`: Qwen's ChatML exactly as Qwen's `make_context` tokenizes it (role, newline and content apart);
- `seed`: the Qwen-7B-Chat tutorial's `process_func`, token for token (see `SeedFormat`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lowtune.data.read import Message
from lowtune.errors import UserError

if TYPE_CHECKING:  # annotations only: `lowtune train` reads and checks records before transformers is imported
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
FORMAT_FILE_NAME = "chat_format.json"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
SEED_DEFAULT_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."

# How a segment is tokenized: `text` never turns "<|im_end|>" written in a message into a control token;
# `markup` (template text) does; `special` is exactly one special token.
SegmentKind = Literal["text", "markup", "special"]
SHORT_TEXT, KNOWN_TEXTS = 64, 4096  # texts up to this many characters are remembered, up to this many of them


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool = False
    kind: SegmentKind = "text"


class ChatFormat(ABC):
    """Renders conversations for one tokenizer; `encode` for training, `encode_prompt` for generation."""

    name: str
    end_of_turn: str

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system: str | None = None):
        self.tokenizer = tokenizer
        self.system = system
        self._known_ids: dict[bool, dict[str, list[int]]] = {}  # split_special_tokens -> short text -> ids
        self._special_ids: dict[str, int] = {}

    @abstractmethod
    def segments(self, messages: Sequence[Message], generation_prompt: bool = False) -> list[Segment]:
        """Segments of a conversation; with `generation_prompt`, ends with the assistant's turn opened."""

    def with_system(self, messages: Sequence[Message]) -> list[Message]:
        messages = list(messages)
        if self.system is not None and (not messages or messages[0].role != "system"):
            messages.insert(0, Message("system", self.system))
        return messages

    def encode(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """Token ids and labels of a whole conversation (labels are -100 outside trained segments)."""
        return self.encode_many([messages])[0]

    def encode_many(self, conversations: Sequence[Sequence[Message]]) -> list[tuple[list[int], list[int]]]:
        """`encode` of each conversation, with one tokenizer call for all their text segments of each kind (the
        same ids: a fast tokenizer encodes every text of a batch on its own, in Rust, without a Python call each)."""
        return [
            (ids, [token if trained else IGNORE_INDEX for token, trained in zip(ids, flags, strict=True)])
            for ids, flags in self.encode_flags(conversations)
        ]

    def encode_flags(self, conversations: Sequence[Sequence[Message]]) -> list[tuple[list[int], bytearray]]:
        """`encode_many` with, instead of labels, one byte a token: 1 where the token is trained."""
        segments = [self.segments(messages) for messages in conversations]
        texts: dict[bool, list[str]] = {True: [], False: []}  # split_special_tokens: the text segments, markup
        for segment in (segment for each in segments for segment in each if segment.kind != "special"):
            texts[segment.kind == "text"].append(segment.text)
        ids = {split: iter(self._token_ids_of(texts[split], split)) for split in (True, False)}
        encoded = []
        for each in segments:
            input_ids: list[int] = []
            flags = bytearray()
            for segment in each:
                if segment.kind == "special":
                    if segment.text not in self._special_ids:
                        self._special_ids[segment.text] = self.special_id(segment.text)
                    segment_ids = [self._special_ids[segment.text]]
                else:
                    segment_ids = next(ids[segment.kind == "text"])
                input_ids += segment_ids
                flags += (b"\x01" if segment.trained else b"\x00") * len(segment_ids)
            encoded.append((input_ids, flags))
        return encoded

    def _token_ids_of(self, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
        """The ids of each text; short texts (role names, newlines, a default system prompt: most segments of a
        record) are tokenized once and remembered."""
        known = self._known_ids.setdefault(split_special_tokens, {})
        todo = list(dict.fromkeys(text for text in texts if text not in known))
        found = dict(zip(todo, self._tokenize(todo, split_special_tokens), strict=True)) if todo else {}
        if len(known) < KNOWN_TEXTS:
            known.update((text, ids) for text, ids in found.items() if len(text) <= SHORT_TEXT)
        return [known[text] if text in known else found[text] for text in texts]

    def _tokenize(self, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
        """The tokenizer's ids of each text; a fast tokenizer is called directly (transformers' wrapper costs more
        than the Rust encoding of short texts), where it neither truncates nor pads, so the ids are the same."""
        from tokenizers import Tokenizer  # here: `lowtune train` checks records before tokenizers is imported

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer) or backend.truncation is not None or backend.padding is not None:
            call = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens)
            return call["input_ids"]
        before = backend.encode_special_tokens
        backend.encode_special_tokens = split_special_tokens
        try:
            return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the prompt that asks the model for the next assistant reply."""
        return [i for segment in self.segments(messages, generation_prompt=True) for i in self.token_ids(segment)]

    def token_ids(self, segment: Segment) -> list[int]:
        if segment.kind == "special":
            return [self.special_id(segment.text)]
        return self.tokenizer(segment.text, add_special_tokens=False, split_special_tokens=segment.kind == "text")[
            "input_ids"
        ]

    def special_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        unknown = token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token
        if token_id is None or unknown:
            raise UserError.one(
                f"the {self.name} chat format needs the token {token!r}, which this tokenizer lacks",
                fix="use data.template: tokenizer (the model's own chat template)",
            )
        return token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at the end of the turn, or at the tokenizer's end of text."""
        ids = [self.special_id(self.end_of_turn)]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "system": self.system, "end_of_turn": self.end_of_turn}

    def save(self, folder: str | Path) -> None:
        (Path(folder) / FORMAT_FILE_NAME).write_text(
            json.dumps(self.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8"
        )


class QwenFormat(ChatFormat):
    """Qwen's ChatML as `make_context` builds it: `<|im_start|>` role "\\n" content `<|im_end|>`, turns joined by
    "\\n", each piece tokenized apart; the reply and its `<|im_end|>` are trained."""

    name = "qwen"
    end_of_turn = IM_END

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system: str | None = None):
        super().__init__(tokenizer, QWEN_DEFAULT_SYSTEM if system is None else system)

    def segments(self, messages: Sequence[Message], generation_prompt: bool = False) -> list[Segment]:
        segments: list[Segment] = []
        for message in self.with_system(messages):
            trained = message.role == "assistant" and not generation_prompt
            if segments:
                segments.append(Segment("\n"))
            segments += [
                Segment(IM_START, kind="special"),
                Segment(message.role),
                Segment("\n"),
                Segment(message.content, trained),
                Segment(IM_END, trained, "special"),
            ]
        if generation_prompt:
            segments += [
                Segment("\n"),
                Segment(IM_START, kind="special"),
                Segment("assistant"),
                Segment("\n"),
            ]
        else:
            segments.append(Segment("\n"))
        return segments


class SeedFormat(ChatFormat):
    """The Qwen-7B-Chat tutorial's `process_func`, kept for users who must match old runs.

    It differs from `qwen`: the whole prompt is one string tokenized at once (with special tokens parsed from the
    text), `.strip()` drops the newline before `<|im_start|>assistant`, the trained part starts at
    `<|im_start|>assistant\\n` itself and ends with `<|im_end|>\\n` plus an extra `<|endoftext|>`, and the
    instruction and input are joined with no separator. Earlier turns (history) go into the prompt untrained.
    """

    name = "seed"
    end_of_turn = IM_END

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system: str | None = None):
        super().__init__(tokenizer, SEED_DEFAULT_SYSTEM if system is None else system)

    def segments(self, messages: Sequence[Message], generation_prompt: bool = False) -> list[Segment]:
        messages = self.with_system(messages)
        if not generation_prompt:
            *messages, reply = messages
        prompt = "".join(f"{IM_START}{m.role}\n{m.content}{IM_END}\n" for m in messages).strip()
        if generation_prompt:
            return [Segment(prompt, kind="markup"), Segment(f"{IM_START}assistant\n", kind="markup")]
        return [
            Segment(prompt, kind="markup"),
            Segment(f"{IM_START}assistant\n{reply.content}{IM_END}\n", True, "markup"),
            Segment(ENDOFTEXT, True, "special"),
        ]


class TokenizerFormat(ChatFormat):
    """The model's own Jinja chat template.

    Turns are found by rendering growing prefixes of the conversation: what the template adds for an assistant
    message, up to and including the first special token after it (the end of turn), is trained.
    """

    name = "tokenizer"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        system: str | None = None,
        template: str | None = None,
        end_of_turn: str | None = None,
    ):
        super().__init__(tokenizer, system)
        self.template = template or tokenizer.chat_template
        if not self.template:
            raise UserError.one("the tokenizer has no chat template", fix="use data.template: qwen")
        self.end_of_turn = end_of_turn or self._detect_end_of_turn()

    def render(self, messages: Sequence[Message], generation_prompt: bool = False) -> str:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def segments(self, messages: Sequence[Message], generation_prompt: bool = False) -> list[Segment]:
        messages = self.with_system(messages)
        segments: list[Segment] = []
        rendered = ""
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            prompt = self._extend(rendered, self.render(messages[:index], generation_prompt=True))
            segments.append(Segment(prompt[len(rendered) :], kind="markup"))
            full = self._extend(prompt, self.render(messages[: index + 1]))
            reply = full[len(prompt) :]
            cut = reply.find(self.end_of_turn)
            cut = len(reply) if cut < 0 else cut + len(self.end_of_turn)
            segments += [
                Segment(reply[:cut], not generation_prompt, "markup"),
                Segment(reply[cut:], kind="markup"),
            ]
            rendered = full
        final = self._extend(rendered, self.render(messages, generation_prompt=generation_prompt))
        segments.append(Segment(final[len(rendered) :], kind="markup"))
        return [s for s in segments if s.text]

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"template": self.template}

    def _extend(self, prefix: str, rendered: str) -> str:
        if not rendered.startswith(prefix):
            raise UserError.one(
                "the model's chat template renders a conversation differently from its first "
                "turns (it rewrites earlier messages), so replies cannot be located",
                fix="use data.template: qwen, or a template that only appends turns",
            )
        return rendered

    def _detect_end_of_turn(self) -> str:
        probe = [Message("user", "\u2581U"), Message("assistant", "\u2581A")]
        rendered = self.render(self.with_system(probe))
        after = rendered[rendered.rfind("\u2581A") + 2 :]
        known = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        specials = [t for t in known.union(self.tokenizer.all_special_tokens) if t and t in after]
        if specials:
            return min(specials, key=lambda token: (after.find(token), -len(token)))
        raise UserError.one(
            "cannot find the end-of-turn token in the model's chat template", fix="use data.template: qwen"
        )


FORMATS: dict[str, type[ChatFormat]] = {"qwen": QwenFormat, "seed": SeedFormat, "tokenizer": TokenizerFormat}


def input_separator(template: str) -> str:
    """How an alpaca `instruction` and `input` are joined: the tutorial concatenates them, the others use a newline."""
    return "" if template == "seed" else "\n"


def resolve_template_name(template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    if template != "auto":
        return template
    return "tokenizer" if tokenizer.chat_template else "qwen"


def build_chat_format(template: str, tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> ChatFormat:
    return FORMATS[resolve_template_name(template, tokenizer)](tokenizer, system)


def load_chat_format(folder: str | Path, tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """The chat format a run was trained with, from its output folder."""
    path = Path(folder) / FORMAT_FILE_NAME
    if not path.is_file():
        raise UserError.one(f"no {FORMAT_FILE_NAME} here: not a lowtune adapter folder", folder)
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved["name"] == "tokenizer":
        return TokenizerFormat(tokenizer, saved["system"], saved["template"], saved["end_of_turn"])
    return FORMATS[saved["name"]](tokenizer, saved["system"])
