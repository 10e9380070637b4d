"""The benchmark's model: Qwen-7B's shape with random weights, made on the GPU in the precision under test.

Throughput and memory do not depend on the weights' values, and there is no model hub on the GPU machine; building
in place (bf16 on the GPU, then each linear layer swapped for its bitsandbytes version) takes seconds, where saving
and reloading a 15 GB checkpoint with a quantization config takes minutes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from lowtune import internals

# Qwen-7B(-Chat) as Qwen2: 32 layers of 4096 with 32 heads (no grouped KV), MLP 11008, vocabulary 151,936, untied head.
QWEN_7B_SHAPE = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=151936,
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def qwen_7b_config(layers: int | None = None) -> Qwen2Config:
    """Qwen-7B's shape; `layers` cuts the depth for quick checks."""
    shape = dict(QWEN_7B_SHAPE) | ({"num_hidden_layers": layers} if layers else {})
    return Qwen2Config(**shape)


def build_random_model(config: Qwen2Config, quantization: str, seed: int = 0) -> Qwen2ForCausalLM:
    """A model with random weights on the current GPU: bf16, or its decoder linears in bnb 8-bit or 4-bit NF4 with
    double quantization (what `BitsAndBytesConfig` gives the tutorial's recipe)."""
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = internals.model_from_config(Qwen2ForCausalLM, config, torch.bfloat16)
    if quantization != "none":
        _quantize_linears(model, quantization)
        _mark_quantized(model, quantization)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return model


def _mark_quantized(model: Qwen2ForCausalLM, quantization: str) -> None:
    """What `from_pretrained(quantization_config=...)` records on a model, which Trainer and peft check."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    internals.mark_quantized(model, config)


def _quantize_linears(model: Qwen2ForCausalLM, quantization: str) -> None:
    """Swaps every decoder nn.Linear for its bitsandbytes layer, one at a time (the bf16 copy freed as it goes)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _bnb_linear(child, quantization))


def _bnb_linear(linear: nn.Linear, quantization: str) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.data
    has_bias = linear.bias is not None
    if quantization == "4bit":
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = internals.quantized_parameter(weight, "4bit", layer)
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        layer.weight = internals.quantized_parameter(weight, "8bit", layer)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer
