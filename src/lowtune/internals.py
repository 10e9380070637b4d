"""Every private part of another library that lowtune relies on, named here and used nowhere else.

Each function below reaches into one undocumented attribute, method or op of transformers, peft, bitsandbytes,
accelerate, liger-kernel or torch, and says why lowtune needs it. None hides a missing attribute behind a default:
if a library renames or drops one, the call raises `LibraryChanged` (and `tests/test_internals.py`, which has one
test per function, fails) instead of quietly changing what a run does. Libraries are imported inside the functions,
so that importing this module costs nothing.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class LibraryChanged(RuntimeError):
    """A private part of a library that lowtune uses is gone or changed: the installed version is not supported."""


def _require(owner: Any, name: str, library: str) -> Any:
    if not hasattr(owner, name):
        raise LibraryChanged(f"{library} no longer has {type(owner).__name__}.{name}, which lowtune uses")
    return getattr(owner, name)


# --- transformers -------------------------------------------------------------------------------------------------


def check_overrides(subclass: type, base: type, methods: dict[str, tuple[str, ...]]) -> type:
    """Verifies that the private methods `subclass` overrides still exist in `base` with these parameters.

    An override of a method the base no longer calls would never run (Trainer's `_get_grad_norm` is where the NaN
    guard lives): fail at import instead.
    """
    for name, parameters in methods.items():
        method = _require(base, name, base.__module__.split(".")[0])
        found = tuple(inspect.signature(method).parameters)[1:]  # without self
        if found != parameters:
            raise LibraryChanged(f"{base.__name__}.{name} now takes {found}; lowtune's override expects {parameters}")
    return subclass


@contextmanager
def trainer_output_dir(trainer: Any, folder: str) -> Iterator[None]:
    """Makes `Trainer._save_checkpoint` write its checkpoint-N into `folder` (lowtune's staging folder)."""
    real = _require(trainer, "_get_output_dir", "transformers")
    trainer._get_output_dir = lambda trial=None: folder
    try:
        yield
    finally:
        trainer._get_output_dir = real


def rotate_checkpoints(output_dir: str, save_total_limit: int | None) -> None:
    """transformers' own rotation of checkpoint-N folders (the one Trainer calls after saving)."""
    from transformers import trainer_utils

    _require(trainer_utils, "rotate_checkpoints", "transformers")(
        output_dir=output_dir, save_total_limit=save_total_limit, use_mtime=False
    )


def modeling_function(module: nn.Module, name: str) -> Callable[..., Any]:
    """A function of the modeling file that defines `module`'s class (e.g. `apply_rotary_pos_emb`): the fused
    forwards call the same function the model would (liger-kernel replaces it there)."""
    return _require(sys.modules[type(module).__module__], name, "transformers")


def attention_implementation(model: nn.Module) -> str:
    """The attention kernel a model is set to (`config._attn_implementation`)."""
    return _require(model.config, "_attn_implementation", "transformers")


def attention_function(module: nn.Module) -> Callable[..., Any]:
    """The attention function a model's attention module would call, as its own forward looks it up."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = modeling_function(module, "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention_implementation(module), eager)


def wrap_checkpoint_call(layer: nn.Module, wrapper: Callable[..., Any]) -> None:
    """Routes a checkpointed decoder layer's `checkpoint(forward, *args)` call through `wrapper(checkpoint, ...)`:
    transformers keeps the call in `GradientCheckpointingLayer._gradient_checkpointing_func`."""
    from functools import partial

    checkpoint = _require(layer, "_gradient_checkpointing_func", "transformers")
    layer._gradient_checkpointing_func = partial(wrapper, checkpoint)


def forget_gguf_quantization(model: nn.Module) -> None:
    """A model read from GGUF holds plain dequantized weights, but transformers marks it quantized (`hf_quantizer`
    and `config.quantization_config`) and then refuses to train or save it."""
    _require(model, "hf_quantizer", "transformers")
    model.hf_quantizer = None
    vars(model.config).pop("quantization_config", None)


def mark_quantized(model: nn.Module, quantization_config: Any) -> None:
    """What `from_pretrained(quantization_config=...)` records on a model, for one quantized in place (the bench's
    random model): transformers, Trainer and peft read these attributes (with defaults, so nothing to check here)."""
    from transformers.quantizers import AutoHfQuantizer

    model.config.quantization_config = quantization_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    model.is_quantized = True
    model.is_loaded_in_4bit = bool(quantization_config.load_in_4bit)
    model.is_loaded_in_8bit = bool(quantization_config.load_in_8bit)


def model_from_config(model_class: type, config: Any, dtype: torch.dtype) -> nn.Module:
    """`PreTrainedModel._from_config`: a randomly initialised model in `dtype`, on the current default device."""
    return _require(model_class, "_from_config", "transformers")(config, dtype=dtype)


# --- accelerate ---------------------------------------------------------------------------------------------------


def keep_batch_sampler(prepared: Any, sampler: Any, world_size: int) -> None:
    """`accelerator.prepare(loader)` wraps a batch sampler in a `BatchSamplerShard` on several processes, which would
    share out lowtune's shares again and drop batches whose size differs from the first: make it pass them through."""
    from accelerate.data_loader import BatchSamplerShard

    shard = _require(prepared, "batch_sampler", "accelerate")
    if shard is sampler:
        return  # one process: accelerate left the sampler as it was
    if not isinstance(shard, BatchSamplerShard) or _require(shard, "batch_sampler", "accelerate") is not sampler:
        raise LibraryChanged(
            f"accelerate prepared the batch sampler as {type(shard).__name__} ({world_size} processes)"
        )
    for name in ("num_processes", "process_index", "batch_size"):
        _require(shard, name, "accelerate")
    shard.num_processes, shard.process_index, shard.batch_size = 1, 0, None


# --- bitsandbytes -------------------------------------------------------------------------------------------------


def quant_state(parameter: torch.Tensor) -> Any:
    """The 4-bit quantization state of a `Params4bit` (None for any other tensor)."""
    if type(parameter).__name__ != "Params4bit":
        return None
    return _require(parameter, "quant_state", "bitsandbytes")


def int8_row_scales(layer: nn.Module) -> torch.Tensor:
    """The per-row absmax scales of a `Linear8bitLt`'s int8 weight: kept on its state once the layer has run, on the
    weight before."""
    state = _require(layer, "state", "bitsandbytes")
    scales = _require(state, "SCB", "bitsandbytes")
    return scales if scales is not None else _require(layer.weight, "SCB", "bitsandbytes")


def keep_cpu_4bit_layout(layer: nn.Module) -> None:
    """bitsandbytes repacks CPU 4-bit weights for inference at the first no-grad forward, after which a backward
    fails ("a view of a leaf Variable ... in-place operation"): training needs the plain layout."""
    _require(layer, "support_avx512bf16_for_cpu", "bitsandbytes")
    layer.support_avx512bf16_for_cpu = False


def quantized_parameter(weight: torch.Tensor, quantization: str, layer: nn.Module) -> torch.Tensor:
    """A bf16 weight quantized in place as `from_pretrained` would (`Params4bit`/`Int8Params._quantize`)."""
    import bitsandbytes as bnb

    if quantization == "4bit":
        parameter = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
        )
    else:
        parameter = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return _require(parameter, "_quantize", "bitsandbytes")(weight.device)


# --- peft ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraParts:
    """The parts of a peft LoRA layer that the fused path computes with."""

    base: nn.Module
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    dropout: float
    scale: float
    training: bool


def plain_lora_parts(module: nn.Module) -> LoraParts | None:
    """A peft LoRA layer's adapter, when it is one plain active one (unmerged, no DoRA, no bias, not transposed) on a
    linear, 4-bit or 8-bit base; None for anything else."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or module.merged or module.disable_adapters:
        return None
    adapters = module.active_adapters
    if len(adapters) != 1 or adapters[0] not in module.lora_A:
        return None
    name = adapters[0]
    if module.use_dora[name] or module.lora_bias[name] or module.fan_in_fan_out:
        return None
    if type(module.base_layer).__name__ not in ("Linear", "Linear4bit", "Linear8bitLt"):
        return None
    dropout = module.lora_dropout[name]
    return LoraParts(
        base=module.base_layer,
        a=module.lora_A[name].weight,
        b=module.lora_B[name].weight,
        dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        scale=module.scaling[name],
        training=module.training,
    )


# --- liger-kernel -------------------------------------------------------------------------------------------------


def apply_liger(model: nn.Module, rms_norm: bool, rope: bool, swiglu: bool) -> None:
    """liger-kernel's RMSNorm, RoPE and SwiGLU on a model instance that is already built (its
    `_apply_liger_kernel_to_instance`; the public `apply_liger_kernel_to_*` functions only patch the modeling module,
    for models built later, which liger's instance patch does as well)."""
    from liger_kernel.transformers import monkey_patch

    apply = _require(monkey_patch, "_apply_liger_kernel_to_instance", "liger-kernel")
    apply(
        model=model, rope=rope, rms_norm=rms_norm, swiglu=swiglu, cross_entropy=False, fused_linear_cross_entropy=False
    )


def liger_swiglu() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """liger-kernel's fused silu(gate) * up with its own backward (`ops.swiglu.LigerSiLUMulFunction`)."""
    from liger_kernel.ops import swiglu

    return _require(swiglu, "LigerSiLUMulFunction", "liger-kernel").apply


# --- torch ----------------------------------------------------------------------------------------------------------


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) through oneDNN (`torch.ops.mkldnn._linear_pointwise`, what inductor calls on the CPU):
    torch sends fp32 products to MKL, which runs its SSE code on CPUs not made by Intel."""
    linear = _require(torch.ops.mkldnn, "_linear_pointwise", "torch")
    return linear(x, weight, bias, "none", [], "")


def skip_update_where(optimizer: Any, not_finite: torch.Tensor) -> None:
    """Makes the next `optimizer.step()` of a fused torch Adam/AdamW skip its update on the device when
    `not_finite` (a float scalar tensor) is nonzero: weights, moments and step counts stay as they were, and the host
    never waits to find out. It is the `found_inf` attribute that `torch.amp.GradScaler` sets for fused optimizers."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    if not all(group.get("fused") for group in inner.param_groups):
        raise LibraryChanged(f"the optimizer {type(inner).__name__} is not a fused torch one; found_inf needs it")
    inner.found_inf = not_finite


def in_backward_pass() -> bool:
    """Whether autograd's engine is running a backward pass on this thread: a checkpointed layer's recomputation
    runs inside one (torch has no public way to ask)."""
    return torch._C._current_graph_task_id() != -1
