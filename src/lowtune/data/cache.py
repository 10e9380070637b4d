"""The encoded-set cache: a large file is encoded once, and a later run (or `data inspect`) reads the arrays back.

Entries live in `$LOWTUNE_DATA_CACHE` (`off` disables the cache), else `$LOWTUNE_CACHE/encoded` (by default
`~/.cache/lowtune/encoded`), one folder per entry: the `EncodedSet` arrays as .npy files, read back memory-mapped, and
`meta.json` with a sha256 of each. The key is a sha256 of the file's bytes (read in chunks; about 1 GB/s), the
tokenizer (its whole vocabulary and rules), the chat format (template, system prompt), max_length, and how the file
is read (type, format, columns, roles, the alpaca separator): any change is a new entry. The draw of a mixture is
applied to the whole file's arrays afterwards, so a new weight still reads the cache. Only files of
MIN_CACHED_BYTES or more are cached; the newest MAX_ENTRIES entries are kept, and deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from lowtune.data.encoded import EncodedSet
from lowtune.data.templates import ChatFormat
from lowtune.machine import cache_dir

log = logging.getLogger(__name__)
CACHE_ENV = "LOWTUNE_DATA_CACHE"
FORMAT_VERSION = 1
MIN_CACHED_BYTES = 8 << 20  # smaller files encode in a few seconds
MAX_ENTRIES = 16
META_FILE_NAME = "meta.json"
CHUNK_BYTES = 1 << 20


def cache_root() -> Path | None:
    """Where entries are kept; None when $LOWTUNE_DATA_CACHE is `off`."""
    chosen = os.environ.get(CACHE_ENV, "")
    if chosen.lower() == "off":
        return None
    return Path(chosen) if chosen else cache_dir() / "encoded"


def cacheable(path: Path) -> bool:
    return cache_root() is not None and path.is_file() and path.stat().st_size >= MIN_CACHED_BYTES


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read a chunk at a time; computed once while its size and time stay the same (a
    run's fingerprint at every checkpoint asks again)."""
    stat = path.stat()
    return _file_digest(path.resolve(), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@cache
def _file_digest(path: Path, size: int, modified_ns: int, inode: int) -> str:
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of everything that decides a tokenizer's ids: a fast tokenizer's whole definition, else its vocab."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def entry_key(data_digest: str, reading: dict[str, Any], chat_format: ChatFormat, max_length: int) -> str:
    """The cache key of a file encoded one way."""
    parts = {
        "version": FORMAT_VERSION,
        "data": data_digest,
        "reading": reading,
        "tokenizer": _tokenizer_identity(chat_format.tokenizer),
        "chat_format": chat_format.to_dict(),
        "max_length": max_length,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


_identities: dict[int, tuple[PreTrainedTokenizerBase, str]] = {}


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """tokenizer_identity, computed once per tokenizer object (it serializes the whole vocabulary)."""
    known = _identities.get(id(tokenizer))
    if known is None or known[0] is not tokenizer:
        known = _identities[id(tokenizer)] = (tokenizer, tokenizer_identity(tokenizer))
    return known[1]


def load(key: str) -> EncodedSet | None:
    """The cached set of `key`, memory-mapped; None if there is none. A damaged entry is removed, with a warning."""
    root = cache_root()
    folder = root / key if root else None
    if folder is None or not folder.is_dir():
        return None
    try:
        encoded = _read(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("damaged encoded-set cache %s (%s): removed, encoding again", folder, error)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    os.utime(folder)  # the newest entries are the ones kept
    log.info("encoded set read from cache %s (%d records)", folder, len(encoded))
    return encoded


def _read(folder: Path) -> EncodedSet:
    meta = json.loads((folder / META_FILE_NAME).read_text(encoding="utf-8"))
    if meta["version"] != FORMAT_VERSION:
        raise ValueError(f"format {meta['version']}, not {FORMAT_VERSION}")
    arrays = {}
    for name in EncodedSet.ARRAYS:
        path = folder / f"{name}.npy"
        if sha256_of(path) != meta["sha256"][name]:
            raise ValueError(f"{path.name} does not match its checksum")
        arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
    encoded = EncodedSet(**arrays)
    records = len(encoded.full_lengths)
    consistent = records == meta["records"] and len(encoded.offsets) == records + 1
    if not consistent or int(encoded.offsets[-1]) != len(encoded.ids) or len(encoded.trained) != len(encoded.ids):
        raise ValueError("its arrays do not agree in length")
    return encoded


def save(key: str, encoded: EncodedSet, source: Path) -> Path | None:
    """Writes an entry atomically (a temporary folder renamed into place) and keeps the newest MAX_ENTRIES."""
    root = cache_root()
    if root is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    sums = {}
    for name in EncodedSet.ARRAYS:
        path = staging / f"{name}.npy"
        np.save(path, np.ascontiguousarray(getattr(encoded, name)), allow_pickle=False)
        sums[name] = sha256_of(path)
    meta = {"version": FORMAT_VERSION, "records": len(encoded), "sha256": sums, "source": str(source)}
    meta |= {"created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (staging / META_FILE_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    target = root / key
    try:
        os.replace(staging, target)
    except OSError:  # another process wrote the same entry first
        shutil.rmtree(staging, ignore_errors=True)
    _keep_newest(root)
    log.info("encoded set cached in %s (%d records, %.0f MB)", target, len(encoded), encoded.nbytes() / 1e6)
    return target


def _keep_newest(root: Path) -> None:
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_modified)
    for old in entries[:-MAX_ENTRIES]:
        shutil.rmtree(old, ignore_errors=True)


def _modified(path: Path) -> float:
    return path.stat().st_mtime
