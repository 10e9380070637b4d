"""The allocator settings lowtune prefers: the CUDA allocator's (importable before torch, since it must be set
before CUDA starts) and, on a CPU run, glibc's for host memory (decided in train/resolve.py, set before any weight
is loaded)."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

# Packed rows change length every step; expandable segments let the CUDA allocator reuse memory across sizes
# instead of fragmenting it (bench/NOTES.md: the same 4-bit 7B step at 1.58 s, steady, with it).
EXPANDABLE_SEGMENTS = "expandable_segments:True"
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def prefer_expandable_segments() -> None:
    """Expandable segments, unless the user configured the allocator (PYTORCH_CUDA_ALLOC_CONF)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", EXPANDABLE_SEGMENTS)


def user_malloc_settings(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The glibc malloc settings the user made: MALLOC_* variables, and malloc tunables in GLIBC_TUNABLES."""
    names = sorted(name for name in environ if name.startswith("MALLOC_"))
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    return tuple(names)


def set_mmap_threshold(size: int) -> None:
    """glibc's mallopt(M_MMAP_THRESHOLD, size), as MALLOC_MMAP_THRESHOLD_ would set it at start: every block from
    `size` up is mmapped, so freeing it returns its memory at once; and, fixed, the threshold no longer climbs as
    mmapped blocks are freed (which by default keeps blocks up to 32 MiB in the heap once one was freed)."""
    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size) != 1:
        raise RuntimeError(f"glibc refused mallopt(M_MMAP_THRESHOLD, {size})")
