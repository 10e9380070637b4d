"""Fused LoRA: the hand-written gradients equal autograd's, and a fused model computes what peft computes."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lowtune import internals
from lowtune.model.arch import llama, qwen3
from lowtune.model.fast_lora import GroupKernels, LoRAGroup, fuse_lora
from lowtune.train.loss import install_hidden_state_loss

# Each way the fused groups compute their frozen base products (train/resolve.py picks one per machine).
KERNELS = {
    "per use": dict(),
    "cached": dict(dequantize_once=True),
    "cached, oneDNN": dict(dequantize_once=True, onednn=True),
    "down's input kept": dict(remake_down=False),
}


def reference_group(x, dropout_keep, weights, biases, scales, lora):
    """The plain implementation: y_i = x W_i^T + b_i + s_i (x_d A_i^T) B_i^T, x_d = x * keep / (1 - p)."""
    x_lora = x if dropout_keep is None else x * dropout_keep[0] / (1 - dropout_keep[1])
    outputs = []
    for i, (weight, bias, scale) in enumerate(zip(weights, biases, scales, strict=True)):
        a, b = lora[2 * i], lora[2 * i + 1]
        outputs.append(x @ weight.T + bias + scale * (x_lora @ a.T) @ b.T)
    return outputs


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_group_gradients_equal_autograd(dropout, kernels):
    torch.manual_seed(0)
    dtype = torch.float32 if KERNELS[kernels].get("onednn") else torch.float64  # oneDNN has no float64
    x = torch.randn(13, 6, dtype=dtype, requires_grad=True)
    bases = [torch.nn.Linear(6, out, bias=True, dtype=dtype).requires_grad_(False) for out in (5, 3, 4)]
    ranks = (2, 3, 1)
    lora = []
    for base, rank in zip(bases, ranks, strict=True):
        lora += [
            torch.randn(rank, 6, dtype=dtype, requires_grad=True),
            torch.randn(base.out_features, rank, dtype=dtype, requires_grad=True),
        ]
    scales = [0.5, 2.0, 1.5]
    torch.manual_seed(1)
    fused = LoRAGroup.apply(x, dropout, True, GroupKernels(**KERNELS[kernels]), bases, scales, None, False, *lora)
    torch.manual_seed(1)
    keep = (torch.native_dropout(torch.ones_like(x), dropout, True)[1], dropout) if dropout > 0 else None
    reference = reference_group(x, keep, [b.weight for b in bases], [b.bias for b in bases], scales, lora)
    upstream = [torch.randn_like(y) for y in reference]
    grads_fused = torch.autograd.grad(fused, [x, *lora], upstream)
    grads_reference = torch.autograd.grad(reference, [x, *lora], upstream)
    tolerance = {} if kernels == "per use" else dict(rtol=1e-5, atol=1e-5)  # the products in another order
    for y_fused, y_reference in zip(fused, reference, strict=True):
        torch.testing.assert_close(y_fused, y_reference, **tolerance)
    for g_fused, g_reference in zip(grads_fused, grads_reference, strict=True):
        torch.testing.assert_close(g_fused, g_reference, **tolerance)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_an_input_made_again_in_the_backward_gives_the_same_gradients_and_is_not_kept(dropout):
    torch.manual_seed(0)
    gate, up = (torch.randn(13, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    base = torch.nn.Linear(7, 5, dtype=torch.float64).requires_grad_(False)
    lora = [torch.randn(2, 7, dtype=torch.float64, requires_grad=True)]
    lora.append(torch.randn(5, 2, dtype=torch.float64, requires_grad=True))

    def swiglu(g, u):
        return torch.nn.functional.silu(g) * u

    results, kept = [], []
    for remake in (None, swiglu):
        saved = []
        torch.manual_seed(1)  # the same dropout mask
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            x = swiglu(gate, up)
            inputs = (gate, up) if remake else ()
            (y,) = LoRAGroup.apply(x, dropout, True, GroupKernels(), [base], [2.0], remake, False, *lora, *inputs)
        upstream = torch.ones_like(y)
        results.append((y, torch.autograd.grad(y, [gate, up, *lora], upstream)))
        rows = {t.untyped_storage().data_ptr(): t.numel() for t in saved if t.shape == x.shape}  # distinct memory
        kept.append(sum(rows.values()))
    (y_kept, grads_kept), (y_made, grads_made) = results
    torch.testing.assert_close(y_made, y_kept, rtol=0, atol=0)
    for made, grad in zip(grads_made, grads_kept, strict=True):
        torch.testing.assert_close(made, grad, rtol=0, atol=0)
    # SwiGLU keeps gate and up either way; the group kept x (or its dropped copy) on top of them, and now does not.
    assert kept[0] - kept[1] == x.numel()


def lora_model(folder, quantization=None, dropout=0.0, **lora):
    kwargs = {}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"}, **kwargs)
    if quantization == "4bit":
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                internals.keep_cpu_4bit_layout(module)
    torch.manual_seed(0)
    model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False, **lora
        ),
    )
    install_hidden_state_loss(model.get_base_model())
    return model


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_fused_equals_peft(folder, family, quantization, kernels, **lora):
    torch.manual_seed(0)
    input_ids = torch.randint(0, 5000, (2, 9))
    batch = {"input_ids": input_ids, "labels": input_ids.clone(), "attention_mask": torch.ones_like(input_ids)}
    reference = lora_model(folder, quantization, **lora)
    loss_reference, grads_reference = loss_and_grads(reference, batch)
    fused = lora_model(folder, quantization, **lora)
    assert fuse_lora(fused, family, GroupKernels(**KERNELS[kernels])) == 2  # both decoder layers
    loss_fused, grads_fused = loss_and_grads(fused, batch)
    # 8-bit: the fused path multiplies by the dequantized weight, peft by LLM.int8 (int8 activations): close only.
    tolerance = 5e-2 if quantization == "8bit" else 1e-5
    torch.testing.assert_close(loss_fused, loss_reference, rtol=tolerance, atol=0)
    for name, grad in grads_reference.items():
        relative = ((grads_fused[name] - grad).norm() / grad.norm()).item()
        assert relative < (0.2 if quantization == "8bit" else 1e-4), name


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("quantization", [None, "4bit", "8bit"])
def test_fused_model_equals_peft(tiny_qwen2, quantization, kernels):
    assert_fused_equals_peft(tiny_qwen2, llama.FAMILY, quantization, kernels)


@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_fused_rslora_equals_peft(tiny_qwen2, quantization):
    """rsLoRA is plain LoRA with the scale alpha / sqrt(r): the fused groups take peft's own scale."""
    assert_fused_equals_peft(tiny_qwen2, llama.FAMILY, quantization, "per use", use_rslora=True)
    model = lora_model(tiny_qwen2, quantization, use_rslora=True)
    assert internals.plain_lora_parts(model.base_model.model.model.layers[0].self_attn.q_proj).scale == 8 / 4**0.5


@pytest.mark.parametrize("kernels", ["per use", "cached"])
@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_fused_qwen3_equals_peft(tiny_qwen3, quantization, kernels):
    """Qwen3's head norms sit between the fused projections and the rotary embedding."""
    assert_fused_equals_peft(tiny_qwen3, qwen3.FAMILY, quantization, kernels)


def test_cached_kernels_dequantize_each_group_once(tiny_qwen2):
    model = lora_model(tiny_qwen2, "4bit")
    kernels = GroupKernels(dequantize_once=True)
    fuse_lora(model, llama.FAMILY, kernels)
    input_ids = torch.randint(0, 5000, (2, 9))
    for _ in range(2):
        loss_and_grads(model, {"input_ids": input_ids, "labels": input_ids})
    hidden, intermediate, kv = 64, 128, 32
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 2 * intermediate * hidden + hidden * intermediate
    assert kernels.cached_bytes() == 2 * per_layer * 4  # two layers of fp32 weights, each group dequantized once


def test_fuse_lora_refuses_layers_without_adapters(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(RuntimeError, match="plain LoRA adapter"):
        fuse_lora(model, llama.FAMILY, GroupKernels())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_group_saves_what_the_memory_plan_counts(dropout):
    """train/memory.py counts, per token, the group's input (2 bytes a feature) without dropout, and with it the
    dropped copy and its mask (3 bytes) but not the input: autograd must keep exactly those rows."""
    tokens, features = 64, 32
    x = torch.randn(tokens, features, dtype=torch.bfloat16, requires_grad=True)
    bases = [torch.nn.Linear(features, 16, dtype=torch.bfloat16).requires_grad_(False) for _ in range(2)]
    lora = []
    for base in bases:
        lora += [torch.randn(4, features, requires_grad=True), torch.zeros(base.out_features, 4, requires_grad=True)]
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        LoRAGroup.apply(x, dropout, True, GroupKernels(), bases, [2.0, 2.0], None, False, *lora)
    per_token_rows = [t for t in saved if t.shape == (tokens, features)]  # the (N, in) tensors, not weights or A x
    per_token_bytes = sum(t.element_size() for t in per_token_rows) * features
    assert per_token_bytes == (3 if dropout else 2) * features  # the input as well would make it 5 with dropout


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_recomputed_layer_skips_downs_base_product_and_gives_the_same_gradients(tiny_qwen2, dropout, monkeypatch):
    """Checkpointed, each layer's recomputation runs the base products of q/k/v, o and gate/up (their outputs feed
    what the backward pass needs) but not down's (only the residual sum reads it): the same loss and gradients."""
    from lowtune.model.checkpointing import Checkpointing, enable_checkpointing

    input_ids = torch.randint(0, 5000, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": input_ids, "labels": input_ids.clone(), "attention_mask": torch.ones_like(input_ids)}
    results, calls = [], []
    forward = GroupKernels.forward

    def counted(self, x, bases):
        calls.append((len(bases), internals.in_backward_pass()))
        return forward(self, x, bases)

    monkeypatch.setattr(GroupKernels, "forward", counted)
    for checkpointing in ("off", "on"):
        model = lora_model(tiny_qwen2, dropout=dropout)
        fuse_lora(model, llama.FAMILY, GroupKernels())
        enable_checkpointing(model.get_base_model(), Checkpointing(checkpointing))
        model.train()
        torch.manual_seed(1)  # the same dropout masks (the recomputation replays them)
        results.append(loss_and_grads(model, batch))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(loss_checkpointed, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-6, atol=1e-7)
    forwards = [groups for groups, in_backward in calls if not in_backward]
    recomputed = [groups for groups, in_backward in calls if in_backward]
    assert forwards == [3, 1, 2, 1] * 2 * 2  # two layers, two runs: q/k/v, o, gate/up, down
    assert recomputed == [3, 1, 2] * 2  # the checkpointed run's two layers: no down
