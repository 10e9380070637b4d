"""Several chat requests generated together: one base model, several adapters, one batched `generate` call.

The adapters share the base's weights (peft's named adapters); a batch may mix them, each row computing with its own
adapter (peft's `adapter_names`). Prompts are padded on the left. Each row ends on its own (its chat format's end of
turn, its `max_new_tokens`, a stop string, or its client going away) and its text is handed out as it is decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from lowtune.data.templates import ChatFormat, load_chat_format
from lowtune.errors import Problem, UserError
from lowtune.infer.session import ChatModel, GenerationSettings, base_model_settings
from lowtune.model import arch
from lowtune.model.load import read_tokenizer

log = logging.getLogger(__name__)
BASE_ROW = "__base__"  # peft's adapter name for a row that runs the base alone


@dataclass(frozen=True)
class Served:
    """One model that clients name: an adapter of the shared base (None: the base alone) and its chat format."""

    name: str
    adapter: str | None
    chat_format: ChatFormat


class ModelPool:
    """The base model, loaded once, with every served adapter on it."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int, served: Sequence[Served]):
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.served = {entry.name: entry for entry in served}

    @classmethod
    def from_chat_model(cls, chat_model: ChatModel, name: str) -> ModelPool:
        """One model: a ChatModel (base + adapter, or a plain folder) as `name`."""
        adapter = chat_model.model.active_adapter if isinstance(chat_model.model, PeftModel) else None
        return cls(chat_model.model, chat_model.tokenizer.pad_token_id, [Served(name, adapter, chat_model.chat_format)])

    @classmethod
    def from_adapters(cls, adapters: Mapping[str, Path]) -> ModelPool:
        """Each run folder's adapter under its name, over the base the first was trained on; every run must have
        been trained on that same base, loaded the same way (model section of its config)."""
        (first_name, first_dir), *others = adapters.items()
        problems = _base_mismatches(first_name, first_dir, others)
        if problems:
            raise UserError(problems)
        first = ChatModel.from_adapter(first_dir, adapter_name=first_name)
        served = [Served(first_name, first_name, first.chat_format)]
        for name, folder in others:
            first.model.load_adapter(str(folder), adapter_name=name)
            served.append(Served(name, name, load_chat_format(folder, read_tokenizer(folder))))
            log.info("adapter %r from %s", name, folder)
        return cls(first.model, first.tokenizer.pad_token_id, served)

    @property
    def adapters(self) -> list[str]:
        return [entry.adapter for entry in self.served.values() if entry.adapter]


class StopCutter:
    """Cuts streamed text before the first stop string, holding back any tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of the text so far that surely comes before any stop string, not given out yet."""
        if self.stopped:
            return ""
        text = self._held + text
        found = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.stopped, self._held = True, ""
            return text[: min(found)]
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the text has ended without the stop string."""
        held, self._held = self._held, ""
        return held


@dataclass
class Row:
    """One request in a batch: its prompt, what it may generate, and where its text goes.

    `send` gets each new piece of text; `cancelled` is asked before each token (the client went away).
    """

    served: Served
    prompt_ids: list[int]
    settings: GenerationSettings
    send: Callable[[str], None]
    stops: list[str] = field(default_factory=list)
    cancelled: Callable[[], bool] = lambda: False
    new_ids: list[int] = field(default_factory=list)
    ended_turn: bool = False
    done: bool = False
    _text: str = ""

    def __post_init__(self) -> None:
        self.cutter = StopCutter(self.stops)

    @property
    def stopped_by_string(self) -> bool:
        return self.cutter.stopped

    def take(self, token: int) -> None:
        """The row's next token: ends the turn, or becomes text (held back while it may start a stop string)."""
        if self.done:
            return  # a finished row's padding
        self.new_ids.append(token)
        if token in self.served.chat_format.stop_token_ids:
            self.ended_turn = self.done = True
        else:
            self._emit(self._decoded())
        if len(self.new_ids) >= self.settings.max_new_tokens or self.cutter.stopped or self.cancelled():
            self.done = True
        if self.done:
            held = self.cutter.flush()
            if held:
                self.send(held)

    def _decoded(self) -> str:
        return self.served.chat_format.tokenizer.decode(self.new_ids, skip_special_tokens=True)

    def _emit(self, text: str) -> None:
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        piece = self.cutter.feed(text[len(self._text) :])
        self._text = text
        if piece:
            self.send(piece)


def batch_key(served: Served, settings: GenerationSettings) -> tuple[Any, ...]:
    """Requests that can share one `generate` call: the same sampling and the same end-of-turn tokens."""
    sampling = (settings.temperature, settings.top_p) if settings.temperature > 0 else (0.0, None)
    return sampling, tuple(served.chat_format.stop_token_ids)


@torch.inference_mode()
def generate_rows(pool: ModelPool, rows: Sequence[Row]) -> None:
    """Generates every row's reply in one batched call; the rows must share a `batch_key`."""
    if len({batch_key(row.served, row.settings) for row in rows}) != 1:
        raise ValueError("rows with different sampling or end-of-turn tokens cannot share a batch")
    model, first = pool.model, rows[0]
    longest = max(len(row.prompt_ids) for row in rows)
    most = max(row.settings.max_new_tokens for row in rows)
    warning = arch.context_warning(model.config.to_dict(), longest + most)
    if warning:
        log.warning("%s", warning)
    ids = [[pool.pad_token_id] * (longest - len(row.prompt_ids)) + row.prompt_ids for row in rows]
    mask = [[0] * (longest - len(row.prompt_ids)) + [1] * len(row.prompt_ids) for row in rows]
    options: dict[str, Any] = {}
    if len(pool.adapters) > 1:
        options["adapter_names"] = [row.served.adapter or BASE_ROW for row in rows]
    settings = first.settings
    if settings.temperature > 0:
        options |= dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        options |= dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    model.generate(
        input_ids=torch.tensor(ids, device=model.device),
        attention_mask=torch.tensor(mask, device=model.device),
        stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]),
        max_new_tokens=most,
        eos_token_id=first.served.chat_format.stop_token_ids,
        pad_token_id=pool.pad_token_id,
        **options,
    )


class _RowsDone(StoppingCriteria):
    """Hands each row its newest token and tells `generate` which rows have finished."""

    def __init__(self, rows: Sequence[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            row.take(token)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


def _base_mismatches(first_name: str, first_dir: Path, others: list[tuple[str, Path]]) -> list[Problem]:
    """Adapters trained on another base, or loaded another way, cannot share the first one's."""
    expected = base_model_settings(first_dir).model_dump()
    problems = []
    for name, folder in others:
        settings = base_model_settings(folder).model_dump()
        differing = [key for key in expected if settings.get(key) != expected[key]]
        if differing:
            key = differing[0]
            problems.append(
                Problem(
                    f"adapter {name!r} was trained with model.{key} = {settings.get(key)!r}, adapter {first_name!r} "
                    f"with {expected[key]!r}: adapters served together share one base, loaded one way",
                    folder,
                    fix="serve adapters of different bases from separate lowtune serve processes",
                )
            )
    return problems
