"""Load a causal LM from a local folder in fp32/fp16/bf16, 8-bit or 4-bit, on CUDA or on the CPU.

Qwen-1 checkpoints are converted on load (`lowtune.model.qwen1`); everything else goes through transformers'
`AutoModelForCausalLM`. Every choice made for the user (device, compute dtype) is logged.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowtune.config import ModelSettings
from lowtune.errors import UserError, pickled_objects_refused
from lowtune.model import qwen1
from lowtune.model.default import default_model_path

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_model_path(path: str | Path | None) -> Path:
    """The model folder; no path means the embedded default model."""
    if path is None or str(path) == "":
        return default_model_path()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError.one(
            "model folder not found",
            folder,
            fix="give a local folder with config.json (model.path or --model); lowtune never downloads at run time",
        )
    if not (folder / "config.json").is_file():
        raise UserError.one(
            "no config.json in the model folder",
            folder,
            fix="point at the folder that holds config.json and the weights",
        )
    return folder


def check_quantization_possible(settings: ModelSettings) -> None:
    """Fails early, before any weight is read, when this machine cannot run the requested precision or quantization."""
    wants_bf16 = "bf16" in (settings.precision, settings.compute_dtype)
    if wants_bf16 and settings.device_map != "cpu" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError.one(
            f"this GPU ({torch.cuda.get_device_name()}) has no bf16", fix="set model.precision: fp16 (or fp32)"
        )
    if settings.quantization == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError.one(
            f"quantization {settings.quantization} needs bitsandbytes, which is not installed",
            fix="pip install 'lowtune[quant]', or set model.quantization: none",
        ) from None
    if settings.device_map != "cpu" and not torch.cuda.is_available():
        log.info("No CUDA device: bitsandbytes %s runs on the CPU", settings.quantization)


def load_model(
    path: str | Path | None = None, precision: str = "bf16", quantization: str | None = None, **settings: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Python API: load a local model and its tokenizer, as `lowtune train` does.

    Args:
        path: a local model folder (Hugging Face layout or Qwen-1); None for the embedded SmolLM2-135M-Instruct.
        precision: fp32, fp16 or bf16.
        quantization: None/"none", "8bit" or "4bit".
        **settings: any other field of `ModelSettings` (quant_type, double_quant, compute_dtype, device_map).
    """
    model_settings = ModelSettings(
        path=None if path is None else str(path),
        precision=precision,
        quantization=quantization or "none",
        **settings,
    )
    return load_from_settings(model_settings)


def load_from_settings(settings: ModelSettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_weights(settings), load_tokenizer(settings)


def load_weights(settings: ModelSettings) -> PreTrainedModel:
    """The model alone (the expensive part): callers load the tokenizer first and check the data with it."""
    folder = resolve_model_path(settings.path)
    check_quantization_possible(settings)
    dtype = DTYPES[settings.precision]
    quantization_config = _bitsandbytes_config(settings)
    device_map = _device_map(settings.device_map)
    if qwen1.is_qwen1_checkpoint(folder):
        log.info("%s is a Qwen-1 checkpoint: converting it to Qwen2 on load (no remote code)", folder)
        model = qwen1.load_qwen1_model(
            folder, dtype=dtype, quantization_config=quantization_config, device_map=device_map
        )
    else:
        try:  # transformers prefers safetensors and reads .bin files with weights_only=True
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=dtype,
                quantization_config=quantization_config,
                device_map=device_map,
                trust_remote_code=settings.trust_remote_code,
            )
        except pickle.UnpicklingError as error:
            raise pickled_objects_refused(folder, error) from None
    if settings.quantization == "4bit" and _on_cpu(model):
        _allow_cpu_4bit_training(model)
    return model


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    folder = resolve_model_path(settings.path)
    if qwen1.is_qwen1_checkpoint(folder):
        return qwen1.load_qwen1_tokenizer(folder)
    return read_tokenizer(folder, settings.trust_remote_code)


def read_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer saved in a folder (a model's or an adapter's), with a pad token guaranteed."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info(
            "The tokenizer has no pad token: padding with %s (padded positions are never trained)",
            tokenizer.eos_token,
        )
    return tokenizer


def _bitsandbytes_config(settings: ModelSettings) -> Any:
    if settings.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = settings.compute_dtype or settings.precision
    if settings.compute_dtype is None:
        log.info("4-bit compute dtype: %s (model.precision)", compute)
    storage = {}
    if fsdp_in_use():
        # FSDP flattens and shards parameters of one dtype: the packed 4-bit weights must be stored in the model's.
        storage = {"bnb_4bit_quant_storage": DTYPES[settings.precision]}
        log.info("FSDP: 4-bit weights stored as %s so that FSDP can shard them with the rest", settings.precision)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute],
        **storage,
    )


def fsdp_in_use() -> bool:
    """`accelerate launch` with an FSDP config (FSDP shards the model itself: no device map then)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def _device_map(choice: str) -> Any:
    if fsdp_in_use():
        log.info("device_map: none (FSDP places and shards the model)")
        return None
    if choice == "cpu":
        return {"": "cpu"}
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        # One whole model per process: Trainer (and torchrun/accelerate) then own the placement.
        device = int(os.environ.get("LOCAL_RANK", 0))
        log.info("device_map auto: the whole model on cuda:%d", device)
        return {"": device}
    log.info("device_map auto: no CUDA device, the model stays on the CPU")
    return {"": "cpu"}


def _on_cpu(model: PreTrainedModel) -> bool:
    return next(model.parameters()).device.type == "cpu"


def _allow_cpu_4bit_training(model: PreTrainedModel) -> None:
    """bitsandbytes repacks CPU 4-bit weights for inference at the first no-grad forward, after which a backward
    fails ("a view of a leaf Variable ... in-place operation"); training needs the plain layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
