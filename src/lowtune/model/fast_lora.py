"""Fused LoRA: each group of projections that reads one input (q, k, v; o; gate, up; down) in one autograd function.

peft computes every adapted projection on its own: clone the base output, dropout the input, A, B, scale, add, each
a kernel over full-width activations, twice with checkpointing. Here the input is read once for all the A matrices
of a group, each B product is added in place into the base output, and only the input (after dropout) and the
rank-r products are saved. The adapters stay peft's own parameters, so saving, loading and merging are unchanged.
Which decoder modules get the fused forwards is each model family's business (`model/arch/`).

For one projection y = W x + s B (A x_d), with x_d = dropout(x), a = A x_d and g = dL/dy:
    dL/dB = s g^T a          dL/da = s g B          dL/dA = (dL/da)^T x_d
    dL/dx = g W + mask * ((dL/da) A)          (W is frozen and gets no gradient)

The base products (x W^T forward, g W backward) are `GroupKernels`' business: per use, each weight is dequantized
when it is needed (bnb 4-bit or 8-bit) and multiplied by torch; cached, a group's weights are dequantized once into
one matrix, so a group is one product each way, optionally through oneDNN.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowtune import internals

log = logging.getLogger(__name__)


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight (out, in) in `dtype`: bnb 4-bit and 8-bit weights are dequantized."""
    weight = base.weight
    state = internals.quant_state(weight)
    if state is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, state).to(dtype)
    if weight.dtype == torch.int8:
        scales = internals.int8_row_scales(base)
        return (weight.data.to(dtype) * (scales.to(dtype)[:, None] / 127)).to(dtype)
    return weight.to(dtype)


@dataclass
class GroupKernels:
    """How the fused groups compute their frozen base products, and which SwiGLU the fused MLP runs.

    Attributes:
        dequantize_once: keep each group's base weights dense (dequantized once, one matrix per group) for the
            whole run, instead of dequantizing them in every forward and backward pass.
        onednn: compute those cached products with oneDNN rather than torch's BLAS.
        liger_swiglu: liger-kernel's fused silu(gate) * up (CUDA).
        remake_down: make down's input (the SwiGLU output) again in the backward pass instead of keeping it: 2 bytes
            x intermediate a token and layer less, for ~3% of a step (bench/NOTES.md, change 13).
    """

    dequantize_once: bool = False
    onednn: bool = False
    liger_swiglu: bool = False
    remake_down: bool = True
    _dense: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None, list[int]]] = field(
        default_factory=dict, repr=False
    )

    def forward(self, x: torch.Tensor, bases: Sequence[nn.Module]) -> list[torch.Tensor]:
        """x W_i^T + b_i for each base (rows of x: (N, in))."""
        if not self.dequantize_once:
            return [
                F.linear(x, dense_weight(b, x.dtype), None if b.bias is None else b.bias.to(x.dtype)) for b in bases
            ]
        weight, bias, widths = self._group(bases, x.dtype)
        y = internals.onednn_linear(x, weight, bias) if self.onednn else F.linear(x, weight, bias)  # (N, sum out)
        return list(y.split(widths, dim=1))

    def grad_input(self, grads: Sequence[torch.Tensor], bases: Sequence[nn.Module]) -> torch.Tensor:
        """sum_i g_i W_i (rows: (N, in)), accumulated inside the matrix products."""
        if not self.dequantize_once:
            grad_x = None
            for base, grad in zip(bases, grads, strict=True):
                weight = dense_weight(base, grad.dtype)
                grad_x = grad @ weight if grad_x is None else grad_x.addmm_(grad, weight)
            return grad_x
        weight, _, _ = self._group(bases, grads[0].dtype)
        grad = grads[0] if len(grads) == 1 else torch.cat(list(grads), dim=1)  # (N, sum out)
        return internals.onednn_linear(grad, weight.T) if self.onednn else grad @ weight

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b, for the adapters' own rank-r products (not for a transposed `a` with a long inner dimension, where
        oneDNN is ~100x slower than MKL)."""
        return internals.onednn_linear(a, b.T) if self.onednn else a @ b

    def product_into(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """out = a @ b, written into `out` (a view)."""
        if self.onednn:
            return out.copy_(internals.onednn_linear(a, b.T))
        return torch.mm(a, b, out=out)

    def cached_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w, _, _ in self._dense.values())

    def _group(self, bases: Sequence[nn.Module], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        """The group's weights dequantized into one (sum out, in) matrix, its biases, and each base's width."""
        key = (*map(id, bases), dtype)
        if key not in self._dense:
            weight = torch.cat([dense_weight(base, dtype) for base in bases])
            bias = None
            if any(base.bias is not None for base in bases):
                bias = torch.cat([_bias(base, dtype, weight.device) for base in bases])
            self._dense[key] = (weight, bias, [base.out_features for base in bases])
        return self._dense[key]


def _bias(base: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if base.bias is None:
        return torch.zeros(base.out_features, dtype=dtype, device=device)
    return base.bias.to(dtype)


class LoRAGroup(torch.autograd.Function):
    """Outputs y_i = W_i x + b_i + s_i B_i A_i dropout(x) for projections that share the input x (rows: (N, in))."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        dropout: float,
        training: bool,
        kernels: GroupKernels,
        bases: Sequence[nn.Module],
        scales: Sequence[float],
        remake: Callable[..., torch.Tensor] | None,
        unused_when_recomputed: bool,
        *tensors: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """tensors: the LoRA weights (A, B per base), then, with `remake`, the tensors x is made of: the backward
        pass makes x again as `remake(*those)` instead of keeping it (down's input, the SwiGLU of gate and up, which
        SwiGLU's own backward keeps anyway: 2 bytes x intermediate a token and layer less).

        `unused_when_recomputed`: nothing the backward pass needs is computed from the outputs (down's, which only
        the residual sum reads), so a checkpointed layer's recomputation skips the base products, the largest
        products of the recomputation, and gives zeros: only what this group saves is needed then."""
        dtype = x.dtype
        lora, sources = tensors[: 2 * len(bases)], tensors[2 * len(bases) :]
        a_weights, b_weights = lora[0::2], lora[1::2]  # (r, in) each; (out, r) each
        a_all = torch.cat([a.to(dtype) for a in a_weights])  # (sum r, in)
        keep = None
        if dropout > 0 and training:
            x_lora, keep = torch.native_dropout(x, dropout, True)  # one kernel: scaled output and its bool mask
        else:
            x_lora = x
        a = kernels.matmul(x_lora, a_all.T)  # (N, sum r)
        if unused_when_recomputed and internals.in_backward_pass():
            outputs = [x.new_zeros(x.shape[0], base.out_features) for base in bases]
        else:
            outputs, start = kernels.forward(x, bases), 0
            for y, b_weight, scale in zip(outputs, b_weights, scales, strict=True):
                rank = b_weight.shape[1]
                y.addmm_(a[:, start : start + rank], b_weight.to(dtype).T, alpha=scale)  # in place: no copy of y
                start += rank
        ctx.kernels, ctx.bases, ctx.scales, ctx.dropout, ctx.remake = kernels, bases, scales, dropout, remake
        ctx.sources = len(sources)
        ctx.save_for_backward(None if remake else x_lora, keep, a, a_all, *b_weights, *sources)
        ctx.lora_dtypes = [t.dtype for t in lora]
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_lora, keep, a, a_all, *rest = ctx.saved_tensors
        b_weights, sources = rest[: len(rest) - ctx.sources], rest[len(rest) - ctx.sources :]
        dtype, kernels = a.dtype, ctx.kernels
        if ctx.remake is not None:  # x again, then its dropout from the kept mask: what the forward multiplied
            x_lora = ctx.remake(*sources).reshape(a.shape[0], -1)
            if keep is not None:
                x_lora = x_lora.mul_(keep).mul_(1 / (1 - ctx.dropout))
        grads = [grad.to(dtype) for grad in grad_outputs]
        grad_a = torch.empty_like(a)
        grad_bs, start = [], 0
        for b_weight, scale, grad in zip(b_weights, ctx.scales, grads, strict=True):
            rank = b_weight.shape[1]
            grad_bs.append(scale * (grad.T @ a[:, start : start + rank]))  # (out, r)
            kernels.product_into(grad_a[:, start : start + rank], grad, b_weight.to(dtype)).mul_(scale)
            start += rank
        grad_x = kernels.grad_input(grads, ctx.bases)  # (N, in)
        if keep is None:
            grad_x.addmm_(grad_a, a_all)
        else:  # dropout's backward (keep x 1/(1-p)) and the sum in one pass
            grad_x.addcmul_(kernels.matmul(grad_a, a_all), keep, value=1 / (1 - ctx.dropout))
        grad_a_all = kernels.matmul(grad_a.T, x_lora)  # (sum r, in)
        lora_grads: list[torch.Tensor] = []
        start = 0
        for grad_b, b_weight in zip(grad_bs, b_weights, strict=True):
            rank = b_weight.shape[1]
            lora_grads += [grad_a_all[start : start + rank], grad_b]
            start += rank
        lora_grads = [g.to(d) for g, d in zip(lora_grads, ctx.lora_dtypes, strict=True)]
        return (grad_x, None, None, None, None, None, None, None, *lora_grads, *[None] * ctx.sources)


def lora_group(
    x: torch.Tensor,
    modules: Sequence[nn.Module],
    kernels: GroupKernels,
    remake: tuple[Callable[..., torch.Tensor], Sequence[torch.Tensor]] | None = None,
    unused_when_recomputed: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Applies peft LoRA modules that share their input `x` (..., in) through one `LoRAGroup`; `remake` (a function
    and the tensors it takes) makes `x` again in the backward pass instead of keeping it; `unused_when_recomputed`
    (see `LoRAGroup.forward`) skips the base products when a checkpointed layer is recomputed."""
    parts = [internals.plain_lora_parts(module) for module in modules]
    if any(part is None for part in parts):
        raise RuntimeError("fused LoRA reached a layer that is not one plain peft LoRA adapter")  # fuse_lora checks
    lora = [t for part in parts for t in (part.a, part.b)]
    rows = x.reshape(-1, x.shape[-1])
    if torch.is_autocast_enabled(rows.device.type):
        rows = rows.to(torch.get_autocast_dtype(rows.device.type))
    with torch.autocast(rows.device.type, enabled=False):
        outputs = LoRAGroup.apply(
            rows,
            parts[0].dropout,
            parts[0].training,
            kernels,
            [part.base for part in parts],
            [part.scale for part in parts],
            remake[0] if remake else None,
            unused_when_recomputed,
            *lora,
            *(remake[1] if remake else ()),
        )
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)


def swiglu(gate: torch.Tensor, up: torch.Tensor, liger: bool) -> torch.Tensor:
    return internals.liger_swiglu()(gate, up) if liger else F.silu(gate) * up


def fused_swiglu_mlp(
    x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, kernels: GroupKernels, output_saved: bool
):
    """down(silu(gate(x)) * up(x)): gate and up in one group; with `kernels.remake_down`, down's input is made again
    from gate and up in the backward pass, not kept. `output_saved`: the decoder layer saves something computed from
    the MLP's output for its backward pass (a norm after the MLP); if not, a recomputed layer skips down's base
    product."""
    gate_out, up_out = lora_group(x, [gate, up], kernels)
    activation = partial(swiglu, liger=kernels.liger_swiglu)
    remake = (activation, (gate_out, up_out)) if kernels.remake_down else None
    (output,) = lora_group(activation(gate_out, up_out), [down], kernels, remake, not output_saved)
    return output


def fuse_lora(model: nn.Module, family: Any, kernels: GroupKernels) -> int:
    """Installs `family`'s fused forwards on every attention and MLP module of the model (a `model/arch` family).

    Returns the number of attention modules fused. Raises when a module of the family does not carry one plain LoRA
    adapter on each of its projections: the run's choices said it would (`train/resolve.py`).
    """
    fused = 0
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind not in family.attention_classes and kind not in family.mlp_classes:
            continue
        projections = [child for child_name, child in module.named_children() if child_name.endswith("_proj")]
        if any(internals.plain_lora_parts(child) is None for child in projections):
            raise RuntimeError(f"{name}: not every projection carries one plain LoRA adapter; cannot fuse")
        if kind in family.attention_classes:
            module.forward = partial(family.attention_forward, module, kernels)
            fused += 1
        else:
            module.forward = partial(family.mlp_forward, module, kernels)
    return fused
