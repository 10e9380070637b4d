"""The CUDA allocator setting lowtune prefers (importable before torch, since it must be set before CUDA starts), and
the user's own settings of glibc's host allocator, which the CPU plan reads (train/memory.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping

# Packed rows change length every step; expandable segments let the CUDA allocator reuse memory across sizes
# instead of fragmenting it (bench/NOTES.md: the same 4-bit 7B step at 1.58 s, steady, with it).
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def prefer_expandable_segments() -> None:
    """Expandable segments, unless the user configured the allocator (PYTORCH_CUDA_ALLOC_CONF)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", EXPANDABLE_SEGMENTS)


def user_malloc_settings(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The glibc malloc settings the user made: MALLOC_* variables, and malloc tunables in GLIBC_TUNABLES."""
    names = sorted(name for name in environ if name.startswith("MALLOC_"))
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    return tuple(names)
