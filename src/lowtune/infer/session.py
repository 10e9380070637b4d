"""Generate with a trained adapter, using exactly the chat format it was trained with."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from threading import Thread

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer

from lowtune.config import CONFIG_FILE_NAME, ModelSettings, load_config
from lowtune.data.read import Message
from lowtune.data.templates import ChatFormat, load_chat_format
from lowtune.errors import UserError
from lowtune.model import qwen1
from lowtune.model.load import load_weights, read_tokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


class ChatModel:
    """A base model with its adapter, tokenizer and chat format; streams replies to a conversation."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_format = chat_format

    @classmethod
    def from_adapter(cls, adapter_dir: str | Path, model_path: str | None = None, **overrides: object) -> ChatModel:
        """Loads the base model the adapter was trained on (same precision and quantization) plus the adapter.

        Args:
            adapter_dir: a lowtune output folder (or one of its checkpoints).
            model_path: the base model folder, when it moved since training.
            **overrides: fields of ModelSettings to change (e.g. quantization="none").
        """
        folder = Path(adapter_dir)
        settings = base_model_settings(folder).model_copy(update=overrides)
        if model_path is not None:
            settings.path = model_path
        tokenizer = read_tokenizer(folder)
        chat_format = load_chat_format(folder, tokenizer)
        model = PeftModel.from_pretrained(load_weights(settings), folder)
        return cls(model, tokenizer, chat_format)

    @property
    def default_system(self) -> str | None:
        return self.chat_format.system

    def stream(self, messages: Sequence[Message], settings: GenerationSettings | None = None) -> Iterator[str]:
        """Yields the reply's text as it is generated; stops at the chat format's end of turn."""
        settings = settings or GenerationSettings()
        prompt = torch.tensor([self.chat_format.encode_prompt(messages)], device=self.model.device)
        qwen1.warn_if_beyond_seq_length(self.model.config, prompt.shape[1] + settings.max_new_tokens, log)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            streamer=streamer,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=self.chat_format.stop_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            do_sample=settings.temperature > 0,
        )
        if settings.temperature > 0:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        worker = Thread(target=self._generate, kwargs=kwargs, daemon=True)
        worker.start()
        yield from streamer
        worker.join()

    def reply(self, messages: Sequence[Message], settings: GenerationSettings | None = None) -> str:
        return "".join(self.stream(messages, settings))

    @torch.inference_mode()
    def _generate(self, **kwargs: object) -> None:
        self.model.generate(**kwargs)


def base_model_settings(adapter_dir: Path) -> ModelSettings:
    """The model section of the config the adapter was trained with (saved in every run and checkpoint folder)."""
    if not adapter_dir.is_dir():
        raise UserError.one("adapter folder not found", adapter_dir)
    config_file = adapter_dir / CONFIG_FILE_NAME
    if not config_file.is_file():
        raise UserError.one(
            f"no {CONFIG_FILE_NAME} here: not a lowtune run or checkpoint folder",
            adapter_dir,
            fix="give the output_dir of a lowtune train run, or one of its checkpoint-N folders",
        )
    return load_config(config_file).model
