"""Generate with a trained adapter, using exactly the chat format it was trained with."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from threading import Thread

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteriaList, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from lowtune.config import CONFIG_FILE_NAME, ModelSettings, load_run_config
from lowtune.data.read import Message
from lowtune.data.templates import FORMAT_FILE_NAME, ChatFormat, build_chat_format, load_chat_format
from lowtune.errors import UserError
from lowtune.machine import this_machine
from lowtune.model import arch
from lowtune.model.default import HUB_ID
from lowtune.model.load import DTYPES, dequantize, load_tokenizer, load_weights, read_tokenizer, resolve_model_path
from lowtune.train.resolve import resolve_loading

log = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


def model_dir_chat_format(folder: Path, tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """A model folder's chat format: its `chat_format.json` when it has one (merged folders do), else the one
    training would pick (`auto`: the model's own chat template, or Qwen's ChatML)."""
    if (folder / FORMAT_FILE_NAME).is_file():
        return load_chat_format(folder, tokenizer)
    return build_chat_format("auto", tokenizer)


class ChatModel:
    """A base model with its adapter, tokenizer and chat format; streams replies to a conversation."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_format = chat_format

    @classmethod
    def from_adapter(
        cls,
        adapter_dir: str | Path,
        model_path: str | None = None,
        dequantize_to: str | None = None,
        adapter_name: str = "default",
        **overrides: object,
    ) -> ChatModel:
        """Loads the base model the adapter was trained on (same model settings: its precision auto resolves for this
        machine) plus the adapter.

        Args:
            adapter_dir: a lowtune output folder (or one of its checkpoints).
            model_path: the base model folder, when it moved since training.
            dequantize_to: a quantized base's layers dequantized to this dtype (bf16, fp16, fp32) before the adapter
                is attached: plain weights equal to the quantized ones, into which the adapter can be merged.
            adapter_name: the adapter's name in the peft model (more adapters can be loaded beside it).
            **overrides: fields of ModelSettings to change (e.g. quantization="none"), validated as the YAML is.
        """
        folder = Path(adapter_dir)
        settings = base_model_settings(folder).updated(**overrides)
        if model_path is not None:
            settings.path = model_path
        tokenizer = read_tokenizer(folder)
        chat_format = load_chat_format(folder, tokenizer)
        base = load_weights(settings, resolve_loading(settings, this_machine()))
        if dequantize_to is not None:
            base = dequantize(base, DTYPES[dequantize_to])
        return cls(PeftModel.from_pretrained(base, folder, adapter_name=adapter_name), tokenizer, chat_format)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, **overrides: object) -> ChatModel:
        """Loads a plain model folder (one that `lowtune merge` wrote, or any Hugging Face folder), no adapter.

        The chat format is the folder's `chat_format.json` when it has one (merged folders do), else the one
        training would pick (`auto`: the model's own chat template, or Qwen's ChatML).

        Args:
            model_dir: the model folder (Hugging Face layout, or a Qwen-1 checkpoint).
            **overrides: fields of ModelSettings to change; precision defaults to `saved_precision`.
        """
        folder = resolve_model_path(model_dir)
        settings = ModelSettings(path=str(folder), precision=saved_precision(folder)).updated(**overrides)
        tokenizer = load_tokenizer(settings)
        chat_format = model_dir_chat_format(folder, tokenizer)
        log.info("chat format: %s (end of turn %s)", chat_format.name, chat_format.end_of_turn)
        return cls(load_weights(settings, resolve_loading(settings, this_machine())), tokenizer, chat_format)

    @property
    def default_system(self) -> str | None:
        return self.chat_format.system

    def stream(self, messages: Sequence[Message], settings: GenerationSettings | None = None) -> Iterator[str]:
        """Yields the reply's text as it is generated; stops at the chat format's end of turn."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        prompt = self.chat_format.encode_prompt(messages)
        worker = Thread(
            target=self.generate_ids, args=(prompt, settings or GenerationSettings(), streamer), daemon=True
        )
        worker.start()
        yield from streamer
        worker.join()

    def reply(self, messages: Sequence[Message], settings: GenerationSettings | None = None) -> str:
        return "".join(self.stream(messages, settings))

    @torch.inference_mode()
    def generate_ids(
        self,
        prompt_ids: list[int],
        settings: GenerationSettings,
        streamer: BaseStreamer | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
    ) -> list[int]:
        """Generates in the calling thread and returns the new token ids.

        They end with one of `chat_format.stop_token_ids` when the turn ended, and are cut short when
        `stopping_criteria` says so (a caller that stops listening).
        """
        prompt = torch.tensor([prompt_ids], device=self.model.device)
        warning = arch.context_warning(self.model.config.to_dict(), prompt.shape[1] + settings.max_new_tokens)
        if warning:
            log.warning("%s", warning)
        if settings.temperature > 0:
            sampling = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        else:
            sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        output = self.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            streamer=streamer,
            stopping_criteria=stopping_criteria,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=self.chat_format.stop_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling,
        )
        return output[0, prompt.shape[1] :].tolist()


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
    settings = load_run_config(adapter_dir).model
    if settings.path and not Path(settings.path).expanduser().is_dir():
        settings.path = _moved_base(adapter_dir, settings.path)
    return settings


def _moved_base(adapter_dir: Path, path: str) -> str:
    """A base folder that is not on this machine (the run folder was copied here): the adapter's portable reference
    (adapter_config.json's hub id) where this machine has that model, else the path as it was (loading then says
    what is missing)."""
    adapter_config = adapter_dir / "adapter_config.json"
    if not adapter_config.is_file():
        return path
    reference = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    if reference == path or not HUB_ID.fullmatch(reference):
        return path
    try:
        folder = resolve_model_path(reference)
    except UserError:
        return path
    log.info(
        "the base model folder %s is not on this machine: using %s (%s), the adapter's base", path, reference, folder
    )
    return str(folder)


def saved_precision(model_dir: Path) -> str:
    """fp32 for a model folder saved in fp32 (config.json's dtype), else auto: the machine's best half precision
    when it has one (bf16 or fp16 weights load exactly in fp32 where it has none)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return "fp32" if (config.get("dtype") or config.get("torch_dtype")) == "float32" else "auto"
