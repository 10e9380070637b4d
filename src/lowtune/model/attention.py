"""Attention for packed rows: PyTorch's variable-length flash attention, registered with transformers.

transformers ships varlen kernels only through the flash-attn package; torch (>= 2.10) has its own
`torch.nn.attention.varlen.varlen_attn`. Registered under `lowtune_varlen`, it reads the sample boundaries that
`PackedCollator` passes (`cu_seq_lens_q/k`), so packing costs no padding and builds no mask. Where it is missing
(the CPU), transformers' SDPA with the block-diagonal mask it derives from the position ids is used instead.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel

VARLEN = "lowtune_varlen"


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed record. query: (1, heads, T, D); key/value: (1, kv_heads, T, D)."""
    from torch.nn.attention.varlen import varlen_attn

    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(f"{VARLEN} attention needs packed rows (PackedCollator): got no cu_seq_lens_q")
    # squeeze, not [0]: the gradient of a view comes back as a view, where select's is a zeroed copy (3 per layer).
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # (T, heads, D)
    out = varlen_attn(
        q,
        k,
        v,
        cu_seq_lens_q,
        cu_seq_lens_k,
        max_length_q,
        max_length_k,
        scale=scaling,
        **_causal_flags(k.shape[1] != q.shape[1]),
    )
    return out[None], None  # (1, T, heads, D), as transformers' attention functions return it


def _causal_flags(grouped: bool) -> dict[str, Any]:
    """varlen_attn's signature moved between torch releases (is_causal, then window_size)."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    flags: dict[str, Any] = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    if grouped and "enable_gqa" in parameters:  # before torch 2.12 the flash kernel took fewer key heads unasked
        flags["enable_gqa"] = True
    return flags


# eager keeps (batch, heads, T, T) scores: fine for short rows, not for long ones. On the CPU with padded rows up to
# this length it is faster than SDPA (measured 3.3 s against SDPA's 4.1 s for a SmolLM2-135M step of 8 x 150 tokens:
# the CPU flash kernel is slow on short rows); `train/resolve.py` chooses by it.
EAGER_ON_CPU_UP_TO = 1024


def set_attention(model: PreTrainedModel, name: str) -> None:
    """Sets the model's attention kernel for training (registering lowtune's varlen kernel when it is the one).

    The varlen kernel registers no mask function: transformers then builds no mask (the boundaries come from
    cu_seq_lens) and skips reading the packed position ids back to the host, a wait for the GPU in every pass."""
    if name == VARLEN:
        AttentionInterface.register(VARLEN, varlen_attention_forward)
    model.set_attn_implementation(name)
