"""Merge a trained LoRA adapter into its base model: one plain folder that every runtime loads.

The folder holds safetensors shards, the tokenizer with a Jinja chat template that renders prompts exactly as the
training chat format does, `chat_format.json` (so lowtune itself uses that format), and a generation config that
stops at the format's end of turn.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel

from lowtune.data.templates import ChatFormat, TokenizerFormat
from lowtune.errors import Problem, UserError
from lowtune.infer.session import ChatModel, base_model_settings
from lowtune.model.load import DTYPES
from lowtune.model.qwen_tokenizer import QWEN_CHAT_TEMPLATE

log = logging.getLogger(__name__)

# The seed format's prompt (`SeedFormat`): the turns joined into one string, stripped, then the assistant's turn.
SEED_CHAT_TEMPLATE = (
    "{%- set ns = namespace(prompt='') -%}"
    "{%- for message in messages -%}"
    "{%- set ns.prompt = ns.prompt + '<|im_start|>' + message['role'] + '\\n' -%}"
    "{%- set ns.prompt = ns.prompt + message['content'] + '<|im_end|>\\n' -%}"
    "{%- endfor -%}"
    "{{- ns.prompt | trim -}}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
TEMPLATES = {"qwen": QWEN_CHAT_TEMPLATE, "seed": SEED_CHAT_TEMPLATE}


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "bf16",
    model_path: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Writes base + adapter as one unquantized model folder that plain transformers (or vLLM) loads.

    An adapter trained on an 8-bit or 4-bit base is merged into the full-precision base (quantization: none),
    and the log says what that changes.

    Args:
        adapter_dir: a lowtune run folder (or one of its checkpoints).
        out_dir: the new model folder; an existing non-empty one is replaced only with `overwrite`.
        dtype: bf16, fp16 or fp32: the dtype of the base when merging, and of the saved weights.
        model_path: the base model folder, when it moved since training.
        overwrite: replace a non-empty `out_dir` (only once the merged model is written beside it).
        max_shard_size: largest safetensors shard.

    Returns:
        The merged model folder.
    """
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    settings = base_model_settings(adapter_dir)
    base = model_path or settings.path
    protected = [adapter_dir] + ([Path(base)] if base else [])
    problems = _dtype_problems(dtype) + out_dir_problems(out, overwrite, protected)
    if problems:
        raise UserError(problems)
    chat_model = merged_chat_model(adapter_dir, dtype, model_path)
    model = chat_model.model
    _set_generation_stops(model, chat_model)
    chat_model.tokenizer.chat_template = chat_template(chat_model.chat_format)
    write_replacing(out, lambda folder: _save(model, chat_model, folder, max_shard_size))
    log.info("Merged %s into %s (%s): loads with AutoModelForCausalLM.from_pretrained", adapter_dir, out, dtype)
    return out


def merged_chat_model(adapter_dir: Path, dtype: str, model_path: str | None = None) -> ChatModel:
    """The adapter merged into its full-precision base, in memory, with the run's tokenizer and chat format."""
    quantization = base_model_settings(adapter_dir).quantization
    if quantization != "none":
        _explain_full_precision_merge(quantization, dtype)
    chat_model = ChatModel.from_adapter(
        adapter_dir,
        model_path,
        precision=dtype,
        quantization="none",
        quant_type=None,
        double_quant=None,
        compute_dtype=None,
    )
    return ChatModel(chat_model.model.merge_and_unload(), chat_model.tokenizer, chat_model.chat_format)


def chat_template(chat_format: ChatFormat) -> str:
    """A Jinja chat template whose prompts (`add_generation_prompt=True`) are the format's own prompt text.

    The format's system prompt (the trained default) is added when the conversation has none, as the format does.
    """
    body = chat_format.template if isinstance(chat_format, TokenizerFormat) else TEMPLATES[chat_format.name]
    if chat_format.system is None:
        return body
    # json.dumps writes a valid Jinja string literal (same escapes), whatever the system prompt holds.
    system = json.dumps(chat_format.system, ensure_ascii=False)
    default_system = (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        f"{{% set messages = [{{'role': 'system', 'content': {system}}}] + messages %}}"
        "{% endif %}"
    )
    return default_system + body


def _dtype_problems(dtype: str) -> list[Problem]:
    if dtype in DTYPES:
        return []
    return [Problem(f"unknown dtype {dtype!r}", fix="use " + ", ".join(DTYPES))]


def out_dir_problems(out: Path, overwrite: bool, protected: list[Path]) -> list[Problem]:
    """What stops writing the folder `out`: a file there, or a non-empty folder without `overwrite` (or one that
    holds a folder in `protected`, which the export reads)."""
    if out.exists() and not out.is_dir():
        return [Problem("the output exists and is not a folder", out)]
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not overwrite:
        return [Problem("the output folder is not empty", out, fix="choose another --out, or pass --overwrite")]
    inside = [p for p in protected if p.resolve() == out.resolve() or out.resolve() in p.resolve().parents]
    return [Problem(f"--overwrite would delete {p}, which the merge reads", out) for p in inside]


def _explain_full_precision_merge(quantization: str, dtype: str) -> None:
    log.info(
        "The adapter was trained on a %s base; it is merged into the full-precision (%s) base weights instead, "
        "since LoRA cannot be merged into quantized ones. The adapter learned against the quantized weights, and "
        "the merged model no longer has their rounding error, so its answers can differ slightly from those of "
        "the %s base + adapter. To deploy in %s, quantize the merged model again (e.g. load it with "
        "transformers' BitsAndBytesConfig).",
        quantization,
        dtype,
        quantization,
        quantization,
    )


def _set_generation_stops(model: PreTrainedModel, chat_model: ChatModel) -> None:
    """Runtimes that read generation_config.json stop where lowtune chat does: at the end of the turn."""
    model.generation_config.eos_token_id = chat_model.chat_format.stop_token_ids
    model.generation_config.pad_token_id = chat_model.tokenizer.pad_token_id


def _save(model: PreTrainedModel, chat_model: ChatModel, folder: Path, max_shard_size: int | str) -> None:
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    chat_model.tokenizer.save_pretrained(folder)
    chat_model.chat_format.save(folder)
    # safetensors writes its files readable by their owner alone (0600), but a deployed model is often read by a
    # server running as another user: the shards get the permissions of the folder's other files.
    mode = (folder / "config.json").stat().st_mode
    for shard in folder.glob("*.safetensors"):
        shard.chmod(mode)


def write_replacing(out: Path, write: Callable[[Path], None]) -> None:
    """Writes into a sibling folder, then puts it in place: a failed export leaves `out` as it was, never half
    written (half a model folder would load later with random weights)."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a merge that was killed
    staging.mkdir(parents=True)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
