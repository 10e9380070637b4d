"""lowtune: low-precision LoRA fine-tuning of chat LLMs (fp16/bf16, 8-bit, 4-bit QLoRA) from one config.

Python API (the same functions the CLI uses):
    model, tokenizer = lowtune.load_model(path, precision="auto", quantization=None)
    rows = lowtune.encode_records(records, tokenizer, template="auto", system=None, max_length=1024)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
__all__ = ["load_model", "encode_records", "__version__"]

_LAZY = {"load_model": "lowtune.recipe", "encode_records": "lowtune.data.encode"}


def __getattr__(name: str) -> Any:
    """Imports torch and transformers only when the API is used, so `lowtune --help` starts fast."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowtune' has no attribute {name!r}")
