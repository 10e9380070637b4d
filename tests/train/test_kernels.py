"""The kernels a run installs are the ones resolve chose: liger-kernel's parts, or none of them, and the fused groups.

liger-kernel is installed with the dev extra; its patches are applied here to CPU models and never run.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lowtune import machine
from lowtune.config import RunConfig
from lowtune.model.arch import PROJECTIONS, read_model_config
from lowtune.train.kernels import apply_kernels
from lowtune.train.resolve import resolve_run

H100 = machine.Gpu("NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)


def liger_forwards(model) -> list[str]:
    """Modules whose forward is liger-kernel's."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(module.forward, "__func__", module.forward).__module__.startswith("liger_kernel")
    ]


def kernels_on_a_gpu_machine(folder, liger):
    config = RunConfig.model_validate(
        {"lora": {"target_modules": list(PROJECTIONS)}, "train": {"liger": liger, "cuda_graphs": False}}
    )
    gpu = replace(machine.this_machine(), gpu=H100, packages=frozenset({"liger_kernel"}), varlen_attention=True)
    resolved = resolve_run(config, gpu, read_model_config(folder), [100] * 20, "qwen")
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), LoraConfig(r=4, target_modules="all-linear")
    )
    return resolved, model, apply_kernels(model, resolved)


def test_liger_false_leaves_no_liger_module_and_no_liger_kernel(tiny_qwen2, qwen2_modeling_restored):
    resolved, model, kernels = kernels_on_a_gpu_machine(tiny_qwen2, False)
    assert resolved.liger == () and resolved.loss == "chunked"
    assert liger_forwards(model) == [] and not kernels.liger_swiglu


def test_liger_auto_on_a_gpu_applies_every_part(tiny_qwen2, qwen2_modeling_restored):
    resolved, model, kernels = kernels_on_a_gpu_machine(tiny_qwen2, "auto")
    assert set(resolved.liger) == {"rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"}
    assert resolved.loss == "liger" and kernels.liger_swiglu
    patched = liger_forwards(model)
    assert "base_model.model.model.norm" in patched and any(name.endswith("input_layernorm") for name in patched)


def test_the_fused_groups_reach_every_layer_or_the_run_stops(tiny_qwen2, qwen2_modeling_restored):
    resolved, model, _ = kernels_on_a_gpu_machine(tiny_qwen2, False)
    assert resolved.fused_lora
    _, unfused, _ = kernels_on_a_gpu_machine(tiny_qwen2, False)
    unfused.get_base_model().config.num_hidden_layers = 3  # a model that disagrees with what was resolved
    with pytest.raises(RuntimeError, match="fused LoRA reached 2 of 3"):
        apply_kernels(unfused, resolved)
