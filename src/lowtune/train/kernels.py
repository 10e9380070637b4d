"""The kernels a run uses beyond transformers' defaults, installed as `train/resolve.py` chose them."""

from __future__ import annotations

from peft import PeftModel

from lowtune import internals
from lowtune.model import arch
from lowtune.model.fast_lora import GroupKernels, fuse_lora
from lowtune.train.resolve import Resolved


def apply_kernels(model: PeftModel, resolved: Resolved) -> GroupKernels | None:
    """liger-kernel's RMSNorm/RoPE/SwiGLU (the parts chosen), then lowtune's fused LoRA groups.

    Returns the fused groups' kernels (they hold the cached base weights), or None when peft's forward runs.
    """
    parts = set(resolved.liger)
    if parts & {"rms_norm", "rope", "swiglu"}:
        internals.apply_liger(
            model.get_base_model(), rms_norm="rms_norm" in parts, rope="rope" in parts, swiglu="swiglu" in parts
        )
    if not resolved.fused_lora:
        return None
    kernels = GroupKernels(
        dequantize_once=resolved.base_weights == "cached",
        onednn=resolved.onednn,
        liger_swiglu="swiglu" in parts,
        remake_down=resolved.remake_down,
    )
    layers = fuse_lora(model, arch.family_named(resolved.family), kernels)
    expected = model.get_base_model().config.num_hidden_layers
    if layers != expected:
        raise RuntimeError(f"fused LoRA reached {layers} of {expected} decoder layers (the {resolved.family} family)")
    return kernels
