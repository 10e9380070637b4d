"""Several chat requests generated together: one base model, several adapters, one decoding loop.

The adapters share the base's weights (peft's named adapters); a batch may mix them, each row computing with its own
adapter (peft's `adapter_names`) and sampling with its own settings. Rows join the batch between two decoding steps
and leave it at the step they end (their chat format's end of turn, their `max_new_tokens`, a stop string, or their
client going away); each row's text is handed out as it is decoded.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import DynamicCache, PreTrainedModel, TemperatureLogitsWarper, TopPLogitsWarper

from lowtune.data.templates import ChatFormat, load_chat_format
from lowtune.errors import Problem, UserError
from lowtune.infer.session import ChatModel, GenerationSettings, base_model_settings
from lowtune.model.load import read_tokenizer
from lowtune.model.lora import ADAPTER_CONFIG_FILE_NAME

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
        problems = _base_mismatches(first_name, first_dir, others) + _dora_beside_others(adapters)
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


class Decoder:
    """Rows decoded together one token a step: a row joins between two steps and leaves at the step it ends
    (continuous batching), so that a long reply holds up no other and a finished or cancelled row frees its slot
    at once.

    `generate` decodes rows in lock-step from start to end; here each row keeps its own position and settings in one
    key/value cache whose rows are padded on the left to a common length (the padding masked out).
    """

    def __init__(self, pool: ModelPool):
        self.pool = pool
        self.rows: list[Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=pool.model.device)  # real (1) or padding (0)
        self._positions = torch.zeros(0, dtype=torch.long, device=pool.model.device)  # each row's next position
        self._cache_argument = _cache_argument(pool.model)

    @torch.inference_mode()
    def add(self, rows: Sequence[Row]) -> list[Row]:
        """Reads the rows' prompts (one forward pass together) and gives each its first token; returns those that
        ended on it."""
        if not rows:
            return []
        width = max(len(row.prompt_ids) for row in rows)
        device = self.pool.model.device
        ids = torch.tensor([[self.pool.pad_token_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows])
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(rows, ids, mask, positions, cache)
        self._join(rows, cache, mask, positions[:, -1] + 1)
        return self._advance(rows, logits)

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One more token for every row; returns the rows that ended on it (they have left the batch)."""
        last = torch.tensor([[row.new_ids[-1]] for row in self.rows], device=self.pool.model.device)
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)
        logits = self._forward(self.rows, last, self._mask, self._positions[:, None], self._cache)
        self._positions += 1
        return self._advance(self.rows, logits)

    def _forward(
        self, rows: Sequence[Row], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        options: dict[str, Any] = {self._cache_argument: cache}
        if len(self.pool.adapters) > 1:
            options["adapter_names"] = [row.served.adapter or BASE_ROW for row in rows]
        output = self.pool.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **options,
        )
        return output.logits[:, -1].float()

    def _advance(self, rows: Sequence[Row], logits: torch.Tensor) -> list[Row]:
        """Hands each row its next token and lets the rows that ended leave."""
        for row, token in zip(rows, _next_tokens(logits, rows), strict=True):
            row.take(token)
        ended = [row for row in self.rows if row.done]
        if ended:
            self._keep([index for index, row in enumerate(self.rows) if not row.done])
        return ended

    def _join(self, rows: Sequence[Row], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if self._cache is None or not self.rows:
            self.rows, self._cache, self._mask, self._positions = list(rows), cache, mask, positions
            return
        width = max(self._mask.shape[1], mask.shape[1])
        pad = functools.partial(_pad_left, width=width, dim=2)
        merged = [
            tuple(torch.cat([pad(old), pad(new)]) for old, new in zip(a, b, strict=True))
            for a, b in zip(_layers(self._cache), _layers(cache), strict=True)
        ]
        self._cache = DynamicCache(merged)
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)])
        self._positions = torch.cat([self._positions, positions])
        self.rows += rows

    def _keep(self, indices: list[int]) -> None:
        """Only these rows stay; the cache loses the columns that only the others needed."""
        self.rows = [self.rows[index] for index in indices]
        if not self.rows:
            self._cache = None
            return
        chosen = torch.tensor(indices, device=self._mask.device)
        self._mask, self._positions = self._mask[chosen], self._positions[chosen]
        unused = int(self._mask.any(dim=0).int().argmax())  # leading columns that are padding in every row
        self._mask = self._mask[:, unused:]
        self._cache = DynamicCache([(k[chosen, :, unused:], v[chosen, :, unused:]) for k, v in _layers(self._cache)])


def generate_rows(pool: ModelPool, rows: Sequence[Row]) -> None:
    """Every row's reply, the rows decoded together from start to end."""
    decoder = Decoder(pool)
    decoder.add(rows)
    while decoder.rows:
        decoder.step()


def _next_tokens(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """Greedy, or sampled with the row's own temperature and top-p (transformers' warpers)."""
    tokens = logits.argmax(dim=-1)
    for index, row in enumerate(rows):
        if row.settings.temperature > 0:
            scores = TemperatureLogitsWarper(row.settings.temperature)(None, logits[index : index + 1])
            scores = TopPLogitsWarper(row.settings.top_p)(None, scores)
            tokens[index] = torch.multinomial(scores.softmax(dim=-1), 1)[0, 0]
    return tokens.tolist()


def _cache_argument(model: PreTrainedModel) -> str:
    """The forward argument that takes the key/value cache: transformers renamed `past_key_values` to `cache`."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values, [rows, heads, positions, head size]."""
    return [(layer[0], layer[1]) for layer in cache]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _dora_beside_others(adapters: Mapping[str, Path]) -> list[Problem]:
    """Rows of several adapters are generated together through peft's `adapter_names`, which peft refuses for DoRA
    adapters (their magnitudes rescale the whole layer's output, not an added term)."""
    if len(adapters) < 2:
        return []
    return [
        Problem(
            f"adapter {name!r} is a DoRA adapter (lora.variant: dora), and peft cannot batch one beside other adapters",
            folder,
            fix="serve it from a lowtune serve process of its own (alone it is served as trained)",
        )
        for name, folder in adapters.items()
        if _uses_dora(folder)
    ]


def _uses_dora(folder: Path) -> bool:
    config = folder / ADAPTER_CONFIG_FILE_NAME
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("use_dora"))


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
