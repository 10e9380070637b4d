"""Load a causal LM from a local folder in fp32/fp16/bf16, 8-bit or 4-bit, on CUDA or on the CPU.

How (precision, quantization details, device map) is a `Loading`, which `train/resolve.py` decides for the machine
at hand; this module only carries it out. Qwen-1 checkpoints are converted on load (`model/arch/qwen1.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lowtune import internals
from lowtune.config import ModelSettings
from lowtune.model import arch
from lowtune.model.default import resolve_model_path  # noqa: F401 (where callers have long imported it from)

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Loading:
    """How a model's weights are loaded here: every field decided by `train/resolve.py`."""

    precision: str  # dtype of the weights that are not quantized, and of the computation
    quantization: str = "none"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None  # of the 4-bit products
    device_map: Any = None  # an accelerate device map; None: FSDP places the model
    fsdp: bool = False  # the 4-bit weights are stored in `precision`'s dtype, so that FSDP can shard them

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def bitsandbytes_config(self) -> Any:
        if self.quantization == "none":
            return None
        from transformers import BitsAndBytesConfig

        if self.quantization == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        storage = {"bnb_4bit_quant_storage": self.dtype} if self.fsdp else {}
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=DTYPES[self.compute_dtype or self.precision],
            **storage,
        )


def load_weights(settings: ModelSettings, loading: Loading) -> PreTrainedModel:
    """The model alone (the expensive part): callers load the tokenizer first and check the data with it."""
    folder = resolve_model_path(settings.path)
    model = arch.load_checkpoint(
        folder,
        trust_remote_code=settings.trust_remote_code,
        dtype=loading.dtype,
        quantization_config=loading.bitsandbytes_config(),
        device_map=loading.device_map,
    )
    if loading.quantization == "4bit" and next(model.parameters()).device.type == "cpu":
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                internals.keep_cpu_4bit_layout(module)
    return model


def dequantize(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The model with its bitsandbytes 4-bit or 8-bit layers replaced by plain linear layers holding the weights
    they compute with (transformers' `dequantize`, through bitsandbytes' own dequantize functions), all in `dtype`.

    Unlike the full-precision checkpoint, these weights carry the quantization's rounding, as in training."""
    return model.dequantize(dtype=dtype).to(dtype)


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    return read_tokenizer(resolve_model_path(settings.path), settings.trust_remote_code)


def read_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer saved in a folder (a model's or an adapter's), with a pad token guaranteed."""
    tokenizer = arch.load_checkpoint_tokenizer(Path(folder), trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info(
            "The tokenizer has no pad token: padding with %s (padded positions are never trained)",
            tokenizer.eos_token,
        )
    return tokenizer
