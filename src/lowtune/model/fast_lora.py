"""Fused LoRA for Llama-family decoder layers: q/k/v and gate/up each in one autograd function.

peft computes every adapted projection on its own: clone the base output, dropout the input, A, B, scale, add, each
a kernel over full-width activations, twice with checkpointing. Here a group of projections that read the same input
(q, k, v; gate, up; o; down) is one autograd function: the base weights are dequantized on the fly (bnb 4-bit or
8-bit, or used as they are), the input is read once for all the A matrices, and each B product is added in place
into the base output. Only the input (after dropout) and the rank-r products are saved. The adapters stay peft's
own parameters, so saving, loading and merging are unchanged.

For one projection y = W x + s B (A x_d), with x_d = dropout(x), a = A x_d and g = dL/dy:
    dL/dB = s g^T a          dL/da = s g B          dL/dA = (dL/da)^T x_d
    dL/dx = g W + mask * ((dL/da) A)          (W is frozen and gets no gradient)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight (out, in) in `dtype`: bnb 4-bit and 8-bit weights are dequantized."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, quant_state).to(dtype)
    if weight.dtype == torch.int8:
        state = getattr(base, "state", None)
        scales = state.SCB if state is not None and state.SCB is not None else weight.SCB
        return (weight.data.to(dtype) * (scales.to(dtype)[:, None] / 127)).to(dtype)
    return weight.to(dtype)


class LoRAGroup(torch.autograd.Function):
    """Outputs y_i = W_i x + b_i + s_i B_i A_i dropout(x) for projections that share the input x (rows: (N, in))."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        dropout: float,
        training: bool,
        bases: Sequence[nn.Module],
        scales: Sequence[float],
        *lora: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        dtype = x.dtype
        a_weights, b_weights = lora[0::2], lora[1::2]  # (r, in) each; (out, r) each
        a_all = torch.cat([a.to(dtype) for a in a_weights])  # (sum r, in)
        keep = None
        if dropout > 0 and training:
            x_lora, keep = torch.native_dropout(x, dropout, True)  # one kernel: scaled output and its bool mask
        else:
            x_lora = x
        a = x_lora @ a_all.T  # (N, sum r)
        outputs, start = [], 0
        for base, b_weight, scale, a_weight in zip(bases, b_weights, scales, a_weights, strict=True):
            rank = a_weight.shape[0]
            y = F.linear(x, dense_weight(base, dtype), None if base.bias is None else base.bias.to(dtype))
            y.addmm_(a[:, start : start + rank], b_weight.to(dtype).T, alpha=scale)  # in place: no copy of y
            outputs.append(y)
            start += rank
        ctx.bases, ctx.scales, ctx.dropout = bases, scales, dropout
        ctx.save_for_backward(x_lora, keep, a, a_all, *b_weights)
        ctx.lora_dtypes = [t.dtype for t in lora]
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_lora, keep, a, a_all, *b_weights = ctx.saved_tensors
        dtype = a.dtype
        grad_x = None
        grad_a = torch.empty_like(a)
        grad_bs, start = [], 0
        for base, b_weight, scale, grad in zip(ctx.bases, b_weights, ctx.scales, grad_outputs, strict=True):
            rank = b_weight.shape[1]
            grad = grad.to(dtype)
            a_part = a[:, start : start + rank]
            grad_bs.append(scale * (grad.T @ a_part))  # (out, r)
            torch.mm(grad, b_weight.to(dtype), out=grad_a[:, start : start + rank]).mul_(scale)
            weight = dense_weight(base, dtype)  # (out, in)
            # The products accumulate into grad_x (N, in) inside the matmul: no (N, in) temporary, no add kernel.
            grad_x = grad @ weight if grad_x is None else grad_x.addmm_(grad, weight)
            start += rank
        if keep is None:
            grad_x.addmm_(grad_a, a_all)
        else:  # dropout's backward (keep x 1/(1-p)) and the sum in one pass
            grad_x.addcmul_(grad_a @ a_all, keep, value=1 / (1 - ctx.dropout))
        grad_a_all = grad_a.T @ x_lora  # (sum r, in)
        grads: list[torch.Tensor] = []
        start = 0
        for grad_b, b_weight in zip(grad_bs, b_weights, strict=True):
            rank = b_weight.shape[1]
            grads += [grad_a_all[start : start + rank], grad_b]
            start += rank
        grads = [g.to(d) for g, d in zip(grads, ctx.lora_dtypes, strict=True)]
        return (grad_x, None, None, None, None, *grads)


def lora_group(x: torch.Tensor, modules: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    """Applies peft LoRA modules that share their input `x` (..., in) through one `LoRAGroup`."""
    adapter = modules[0].active_adapters[0]
    dropout = modules[0].lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    lora = [t for m in modules for t in (m.lora_A[adapter].weight, m.lora_B[adapter].weight)]
    rows = x.reshape(-1, x.shape[-1])
    if torch.is_autocast_enabled(rows.device.type):
        rows = rows.to(torch.get_autocast_dtype(rows.device.type))
    with torch.autocast(rows.device.type, enabled=False):
        outputs = LoRAGroup.apply(
            rows, p, modules[0].training, [m.base_layer for m in modules], [m.scaling[adapter] for m in modules], *lora
        )
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)


def fused_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Llama-family attention with fused LoRA projections; the rest is the model's own code path."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = sys.modules[type(self).__module__]
    cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = lora_group(hidden_states, [self.q_proj, self.k_proj, self.v_proj])
    query, key, value = (t.view(hidden_shape).transpose(1, 2) for t in (query, key, value))  # (B, heads, T, D)
    cos, sin = position_embeddings
    query, key = modeling.apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling.eager_attention_forward
    )
    output, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0,
        scaling=self.scaling,
        sliding_window=getattr(self, "sliding_window", None),
        **kwargs,
    )
    (output,) = lora_group(output.reshape(*input_shape, -1).contiguous(), [self.o_proj])
    return output, weights


def fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = lora_group(x, [self.gate_proj, self.up_proj])
    (down,) = lora_group(swiglu(gate, up), [self.down_proj])
    return down


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.is_cuda:
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply(gate, up)
        except ImportError:
            pass
    return F.silu(gate) * up


def fuse_lora(model: nn.Module) -> int:
    """Installs the fused forwards on every decoder layer whose seven projections carry one plain LoRA adapter.

    Returns the number of layers fused (0 when the architecture or the adapters do not fit; then peft's own
    forward runs, and the caller logs why).
    """
    fused = 0
    for module in model.modules():
        if _fusable_attention(module):
            module.forward = fused_attention_forward.__get__(module)
            fused += 1
        elif _fusable_mlp(module):
            module.forward = fused_mlp_forward.__get__(module)
    return fused


def _fusable_attention(module: nn.Module) -> bool:
    if not all(hasattr(module, name) for name in ATTENTION_PROJECTIONS + ("head_dim", "scaling", "config")):
        return False
    if hasattr(module, "q_norm") or getattr(module.config, "attention_dropout", 0.0):
        return False  # Qwen3-style q/k norms and attention dropout are not in the fused forward
    return all(_plain_lora(getattr(module, name)) for name in ATTENTION_PROJECTIONS)


def _fusable_mlp(module: nn.Module) -> bool:
    if not all(hasattr(module, name) for name in MLP_PROJECTIONS):
        return False
    activation = getattr(module, "act_fn", None)
    silu = isinstance(activation, nn.SiLU) or type(activation).__name__ in {"SiLUActivation", "SiLU"}
    return silu and all(_plain_lora(getattr(module, name)) for name in MLP_PROJECTIONS)


def _plain_lora(module: nn.Module) -> bool:
    """One active, unmerged LoRA adapter without DoRA or bias, on a linear, 4-bit or 8-bit base layer."""
    if not hasattr(module, "lora_A") or getattr(module, "merged", False) or getattr(module, "disable_adapters", True):
        return False
    adapters = module.active_adapters
    if len(adapters) != 1 or adapters[0] not in module.lora_A:
        return False
    adapter = adapters[0]
    if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
        return False
    base_kind = type(module.base_layer).__name__
    return base_kind in {"Linear", "Linear4bit", "Linear8bitLt"} and not getattr(module, "fan_in_fan_out", False)
