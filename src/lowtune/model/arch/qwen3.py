"""Qwen3: a Llama-style decoder with an RMSNorm on every query and key head, after the projection and before the
rotary embedding (transformers' `Qwen3Attention.forward`); its MLP is Llama's."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowtune.model.arch import Family, llama
from lowtune.model.fast_lora import GroupKernels


def fused_attention_forward(
    self: nn.Module,
    kernels: GroupKernels,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return llama.attention(self, kernels, hidden_states, position_embeddings, attention_mask, qk_norm=True, **kwargs)


FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    attention_classes=("Qwen3Attention",),
    mlp_classes=("Qwen3MLP",),
    attention_forward=fused_attention_forward,
    mlp_forward=llama.fused_mlp_forward,
    qk_norm=True,
)
