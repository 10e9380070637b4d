"""Llama-style decoders (Qwen2/2.5, Llama 2/3, Mistral, SmolLM): their fused LoRA attention and MLP.

The forwards below are the models' own (transformers' `LlamaAttention.forward` and `LlamaMLP.forward`), with each
group of projections that reads one input computed by one `lora_group`; rotary embeddings, the cache and the
attention kernel are the model's own code path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowtune import internals
from lowtune.model.arch import Family
from lowtune.model.fast_lora import GroupKernels, fused_swiglu_mlp, lora_group


def fused_attention_forward(
    self: nn.Module,
    kernels: GroupKernels,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return attention(self, kernels, hidden_states, position_embeddings, attention_mask, qk_norm=False, **kwargs)


def attention(
    self: nn.Module,
    kernels: GroupKernels,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    qk_norm: bool,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with fused q/k/v and o projections; with `qk_norm`, Qwen3's RMSNorm on every query and key head."""
    cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)  # renamed in transformers 5.2x
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = (
        t.view(hidden_shape) for t in lora_group(hidden_states, [self.q_proj, self.k_proj, self.v_proj], kernels)
    )  # (B, T, heads, D)
    if qk_norm:
        query, key = self.q_norm(query), self.k_norm(key)
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, heads, T, D)
    cos, sin = position_embeddings
    query, key = internals.modeling_function(self, "apply_rotary_pos_emb")(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    attend = internals.attention_function(self)
    output, weights = attend(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,  # families with attention dropout are not fused (Family.fused_lora_blocker)
        scaling=self.scaling,
        sliding_window=getattr(self, "sliding_window", None),  # Llama's attention has no sliding window
        **kwargs,
    )
    (output,) = lora_group(output.reshape(*input_shape, -1).contiguous(), [self.o_proj], kernels)
    return output, weights


def fused_mlp_forward(self: nn.Module, kernels: GroupKernels, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), gate and up in one group. The decoder layers of these families add the MLP's
    output to the residual stream and save nothing computed from it."""
    return fused_swiglu_mlp(x, self.gate_proj, self.up_proj, self.down_proj, kernels, output_saved=False)


FAMILY = Family(
    name="llama",
    model_types=("llama", "qwen2", "mistral"),
    attention_classes=("LlamaAttention", "Qwen2Attention", "MistralAttention"),
    mlp_classes=("LlamaMLP", "Qwen2MLP", "MistralMLP"),
    attention_forward=fused_attention_forward,
    mlp_forward=fused_mlp_forward,
)
