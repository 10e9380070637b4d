"""The CUDA allocator setting lowtune prefers; importable before torch, since it must be set before CUDA starts."""

from __future__ import annotations

import os

# Packed rows change length every step; expandable segments let the CUDA allocator reuse memory across sizes
# instead of fragmenting it (bench/NOTES.md: the same 4-bit 7B step at 1.58 s, steady, with it).
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def prefer_expandable_segments() -> None:
    """Expandable segments, unless the user configured the allocator (PYTORCH_CUDA_ALLOC_CONF)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", EXPANDABLE_SEGMENTS)
