"""The kernels a training run uses beyond transformers' defaults, each choice logged."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from peft import PeftModel

from lowtune.config import TrainSettings
from lowtune.model.fast_lora import fuse_lora

log = logging.getLogger(__name__)


def apply_kernels(model: PeftModel, train: TrainSettings) -> None:
    """liger-kernel's RMSNorm/RoPE/SwiGLU on CUDA, then lowtune's fused LoRA projections."""
    base = model.get_base_model()
    if torch.cuda.is_available():
        log.info("CUDA allocator: %s", os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default"))
    if _resolve(train.liger, torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None):
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(
            model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
        log.info("kernels: liger-kernel RMSNorm, RoPE and SwiGLU")
    if _resolve(train.fused_lora, True):
        layers = fuse_lora(model)
        if layers:
            log.info("kernels: fused LoRA projections (q/k/v, o, gate/up, down) in %d decoder layers", layers)
        else:
            log.info(
                "kernels: peft's own LoRA forward (fused LoRA needs Llama-family layers with one plain "
                "adapter on all seven projections)"
            )


def _resolve(setting: bool | str, automatic: bool) -> bool:
    return automatic if setting == "auto" else bool(setting)
