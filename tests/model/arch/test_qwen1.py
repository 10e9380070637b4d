"""Qwen-1 checkpoints load as Qwen2 and compute what the original computes.

The reference below is Qwen-1's forward pass written from the original `modeling_qwen.py` (Qwen-7B-Chat) in
plain fp32 torch on the checkpoint's own (fused, Qwen-1-named) tensors: it shares no code with the conversion.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerFast,
    Qwen2ForCausalLM,
)

from lowtune.errors import UserError
from lowtune.model import arch
from lowtune.model.arch import qwen1
from lowtune.model.qwen_tokenizer import bundled_tiktoken_file

HIDDEN, LAYERS, HEADS, MLP_WIDTH, VOCAB, SEQ_LENGTH = 64, 2, 4, 96, 256, 32
# The first release's config.json names (Qwen-7B-Chat, August 2023) ...
FIRST_RELEASE = {
    "model_type": "qwen",
    "architectures": ["QWenLMHeadModel"],
    "n_embd": HIDDEN,
    "n_layer": LAYERS,
    "n_head": HEADS,
    "ffn_hidden_size": 2 * MLP_WIDTH,
    "kv_channels": HIDDEN // HEADS,
    "vocab_size": VOCAB,
    "padded_vocab_size": VOCAB,
    "layer_norm_epsilon": 1e-5,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "seq_length": SEQ_LENGTH,
    "n_positions": 4 * SEQ_LENGTH,
    "no_bias": True,
    "pos_emb": "rotary",
    "activation": "swiglu",
    "apply_residual_connection_post_layernorm": False,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.0,
    "tie_word_embeddings": False,
}
# ... and the later one's (hidden_size, ...), with another rotary base: a base left at the default shows.
LATER_RELEASE = {
    "model_type": "qwen",
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": 2 * MLP_WIDTH,
    "kv_channels": HIDDEN // HEADS,
    "vocab_size": VOCAB,
    "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 1000,
    "rotary_pct": 1.0,
    "seq_length": SEQ_LENGTH,
    "max_position_embeddings": 4 * SEQ_LENGTH,
    "no_bias": True,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "emb_dropout_prob": 0.0,
    "attn_dropout_prob": 0.0,
    "tie_word_embeddings": False,
}
CONFIGS = {"first-release": FIRST_RELEASE, "later-release": LATER_RELEASE}
STORAGES = ("safetensors", "safetensors-sharded", "bin-sharded")


# --- a tiny Qwen-1 checkpoint, written as Qwen's own code saves it


def qwen1_weights(seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Random Qwen-1 tensors, scaled so that every part (norm weights, biases) moves the logits."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 1 / math.sqrt(HIDDEN), mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std + mean

    weights = {
        "transformer.wte.weight": normal(vocab, HIDDEN, std=1.0),
        "transformer.ln_f.weight": normal(HIDDEN, std=0.1, mean=1.0),
        "lm_head.weight": normal(vocab, HIDDEN),
    }
    for layer in range(LAYERS):
        prefix = f"transformer.h.{layer}."
        weights |= {
            prefix + "ln_1.weight": normal(HIDDEN, std=0.1, mean=1.0),
            prefix + "attn.c_attn.weight": normal(3 * HIDDEN, HIDDEN),
            prefix + "attn.c_attn.bias": normal(3 * HIDDEN, std=0.5),
            prefix + "attn.c_proj.weight": normal(HIDDEN, HIDDEN),
            prefix + "ln_2.weight": normal(HIDDEN, std=0.1, mean=1.0),
            prefix + "mlp.w1.weight": normal(MLP_WIDTH, HIDDEN),
            prefix + "mlp.w2.weight": normal(MLP_WIDTH, HIDDEN),
            prefix + "mlp.c_proj.weight": normal(HIDDEN, MLP_WIDTH, std=1 / math.sqrt(MLP_WIDTH)),
        }
    return weights


# storage -> (file stem, suffix, index file, writer)
WRITERS = {
    "safetensors": ("model", ".safetensors", "model.safetensors.index.json", save_file),
    "bin": ("pytorch_model", ".bin", "pytorch_model.bin.index.json", torch.save),
}


def write_checkpoint(folder: Path, config: dict, weights: dict[str, torch.Tensor], storage: str) -> Path:
    """A Qwen-1 folder: config.json, qwen.tiktoken, and the weights in one file or two shards and an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(bundled_tiktoken_file(), folder / "qwen.tiktoken")
    stem, suffix, index, write = WRITERS[storage.removesuffix("-sharded")]
    names = sorted(weights)
    if not storage.endswith("-sharded"):
        write({name: weights[name].contiguous() for name in names}, folder / (stem + suffix))
        return folder
    weight_map = {}
    for number, shard in enumerate([names[: len(names) // 2], names[len(names) // 2 :]], start=1):
        file = f"{stem}-{number:05d}-of-00002{suffix}"
        write({name: weights[name].contiguous() for name in shard}, folder / file)
        weight_map |= dict.fromkeys(shard, file)
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return qwen1_weights()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, weights) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("qwen1"), LATER_RELEASE, weights, "safetensors")


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ_LENGTH), generator=torch.Generator().manual_seed(1))


# --- the reference: Qwen-1's forward pass (modeling_qwen.py, eval mode, no cache)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def qwen1_rotary(length: int, head_dim: int, base: float, ntk_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-1's RotaryEmbedding: base stretched by dynamic NTK's alpha, frequencies repeated twice."""
    base = base * ntk_alpha ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, head_dim): broadcast over heads
    return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)  # Qwen-1's _rotate_half: "(j d) -> j d" with j=2
    return t * cos + torch.cat((-second, first), dim=-1) * sin


def qwen1_reference_logits(
    raw: dict, weights: dict[str, torch.Tensor], ids: torch.Tensor, long_context: bool = False
) -> torch.Tensor:
    """Qwen-1's logits; `long_context` adds what it does at inference past seq_length (dynamic NTK, log-n)."""
    w = {name: tensor.float() for name, tensor in weights.items()}
    hidden = raw.get("hidden_size") or raw["n_embd"]
    heads = raw.get("num_attention_heads") or raw["n_head"]
    layers = raw.get("num_hidden_layers") or raw["n_layer"]
    eps, seq_length, head_dim = raw["layer_norm_epsilon"], raw["seq_length"], hidden // heads
    batch, length = ids.shape
    ntk_alpha = max(2 ** math.ceil(math.log2(length / seq_length) + 1) - 1, 1) if long_context else 1
    cos, sin = qwen1_rotary(length, head_dim, raw["rotary_emb_base"], ntk_alpha)
    logn = torch.tensor([math.log(i, seq_length) if i > seq_length else 1.0 for i in range(1, length + 1)])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    x = w["transformer.wte.weight"][ids]  # (B, T, hidden)
    for layer in range(layers):
        p = f"transformer.h.{layer}."
        h = rms_norm(x, w[p + "ln_1.weight"], eps)
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]  # (B, T, 3 x hidden)
        q, k, v = (part.view(batch, length, heads, head_dim) for part in qkv.split(hidden, dim=-1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if long_context:
            q = q * logn[None, :, None, None]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        context = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v).reshape(batch, length, hidden)
        x = x + context @ w[p + "attn.c_proj.weight"].T
        h = rms_norm(x, w[p + "ln_2.weight"], eps)
        mlp = (h @ w[p + "mlp.w1.weight"].T) * F.silu(h @ w[p + "mlp.w2.weight"].T)
        x = x + mlp @ w[p + "mlp.c_proj.weight"].T
    return rms_norm(x, w["transformer.ln_f.weight"], eps) @ w["lm_head.weight"].T


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- loading


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("release", sorted(CONFIGS))
def test_logits_equal_the_qwen1_reference(tmp_path, weights, token_ids, release, storage):
    raw = CONFIGS[release]
    folder = write_checkpoint(tmp_path / "ckpt", raw, weights, storage)
    model = qwen1.load_qwen1_model(folder, dtype="fp32")
    assert type(model) is Qwen2ForCausalLM
    reference = qwen1_reference_logits(raw, weights, token_ids)
    assert reference.std() > 1.0  # not a degenerate network
    assert max_diff(logits_of(model, token_ids), reference) < 1e-4


def swap_w1_w2(monkeypatch):
    monkeypatch.setitem(qwen1.LAYER_RENAMES, "mlp.w1.weight", "mlp.gate_proj.weight")
    monkeypatch.setitem(qwen1.LAYER_RENAMES, "mlp.w2.weight", "mlp.up_proj.weight")


def drop_c_attn_bias(monkeypatch):
    split = qwen1.split_fused_qkv
    monkeypatch.setattr(
        qwen1,
        "split_fused_qkv",
        lambda t: tuple(torch.zeros_like(p) if t.dim() == 1 else p for p in split(t)),
    )


def swap_q_k(monkeypatch):
    split = qwen1.split_fused_qkv
    monkeypatch.setattr(qwen1, "split_fused_qkv", lambda t: (lambda q, k, v: (k, q, v))(*split(t)))


@pytest.mark.parametrize("mistake", [swap_w1_w2, drop_c_attn_bias, swap_q_k])
def test_a_wrong_conversion_is_caught(monkeypatch, checkpoint, weights, token_ids, mistake):
    mistake(monkeypatch)
    model = qwen1.load_qwen1_model(checkpoint, dtype="fp32")
    assert max_diff(logits_of(model, token_ids), qwen1_reference_logits(LATER_RELEASE, weights, token_ids)) > 0.1


def test_safetensors_are_preferred_to_bin(tmp_path, weights, token_ids):
    folder = write_checkpoint(tmp_path, LATER_RELEASE, weights, "safetensors")
    torch.save({name: torch.zeros_like(t) for name, t in weights.items()}, folder / "pytorch_model.bin")
    model = qwen1.load_qwen1_model(folder, dtype="fp32")
    assert max_diff(logits_of(model, token_ids), qwen1_reference_logits(LATER_RELEASE, weights, token_ids)) < 1e-4


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize(("dtype", "name"), [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
def test_half_precision(checkpoint, weights, token_ids, dtype, name):
    model = qwen1.load_qwen1_model(checkpoint, dtype=name)
    assert model.dtype == dtype
    reference = qwen1_reference_logits(LATER_RELEASE, weights, token_ids)
    assert relative_error(logits_of(model, token_ids), reference) < 0.02


def test_8bit_on_cpu(checkpoint, weights, token_ids):
    import bitsandbytes as bnb

    model = qwen1.load_qwen1_model(checkpoint, dtype="fp32", quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    reference = qwen1_reference_logits(LATER_RELEASE, weights, token_ids)
    assert relative_error(logits_of(model, token_ids), reference) < 0.05


def nf4_round_trip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as 4-bit layers hold them: each linear layer's matrix (q, k, v apart) to NF4 and back."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    def round_trip(matrix: torch.Tensor) -> torch.Tensor:
        packed, state = quantize_4bit(matrix, blocksize=64, compress_statistics=True, quant_type="nf4")
        return dequantize_4bit(packed, state)

    linear = {name: t for name, t in weights.items() if name.startswith("transformer.h.") and t.dim() == 2}
    return weights | {
        name: torch.cat([round_trip(part) for part in t.chunk(3)]) if "c_attn" in name else round_trip(t)
        for name, t in linear.items()
    }


def test_4bit_nf4_on_cpu_forward_and_backward(checkpoint, weights, token_ids):
    import bitsandbytes as bnb

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = qwen1.load_qwen1_model(checkpoint, dtype="fp32", quantization_config=config)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 7 * LAYERS
    for module in four_bit:  # NOTES.md: else the no-grad forward repacks weights and backward then fails
        module.support_avx512bf16_for_cpu = False
    logits = logits_of(model, token_ids)
    # Exactly Qwen-1 on 4-bit weights; NF4 itself moves this tiny random network's logits by ~20%.
    assert max_diff(logits, qwen1_reference_logits(LATER_RELEASE, nf4_round_trip(weights), token_ids)) < 1e-4
    assert relative_error(logits, qwen1_reference_logits(LATER_RELEASE, weights, token_ids)) < 0.3
    model.model.embed_tokens.weight.requires_grad_(True)
    model(input_ids=token_ids, labels=token_ids).loss.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_weights_that_do_not_fit_the_config_are_listed(tmp_path, weights):
    raw = LATER_RELEASE | {"num_hidden_layers": LAYERS + 1}
    folder = write_checkpoint(tmp_path, raw, weights | {"transformer.extra.weight": torch.ones(1)}, "safetensors")
    with pytest.raises(UserError) as error:
        qwen1.load_qwen1_model(folder, dtype="fp32")
    message = str(error.value)
    assert "missing tensor model.layers.2.self_attn.q_proj.weight" in message
    assert "unexpected tensor transformer.extra.weight" in message


def test_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LATER_RELEASE))
    with pytest.raises(UserError, match="no weights"):
        qwen1.load_qwen1_model(tmp_path, dtype="fp32")


class Payload:
    """Would touch a file if unpickling ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_bin_file_with_pickled_objects_is_refused(tmp_path, weights):
    marker = tmp_path / "code-ran"
    folder = write_checkpoint(tmp_path / "ckpt", LATER_RELEASE, weights, "bin")
    torch.save(weights | {"lm_head.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="refused"):
        qwen1.load_qwen1_model(folder, dtype="fp32")
    assert not marker.exists()


def test_a_bin_file_with_plain_non_tensors_is_refused(tmp_path, weights):
    folder = write_checkpoint(tmp_path / "ckpt", LATER_RELEASE, weights, "bin")
    torch.save(weights | {"step": 3}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="not tensors: step"):
        qwen1.load_qwen1_model(folder, dtype="fp32")


# --- config


@pytest.mark.parametrize("release", sorted(CONFIGS))
def test_config_of_both_releases(release):
    raw = CONFIGS[release]
    config = qwen1.qwen2_config_from_qwen1(raw)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        HIDDEN,
        LAYERS,
        HEADS,
    )
    assert config.num_key_value_heads == HEADS
    assert config.intermediate_size == MLP_WIDTH
    assert config.vocab_size == VOCAB
    assert config.rms_norm_eps == raw["layer_norm_epsilon"]
    assert config.rope_parameters["rope_theta"] == raw["rotary_emb_base"]
    assert config.qwen1_seq_length == config.max_position_embeddings == SEQ_LENGTH
    assert config.tie_word_embeddings is False
    assert qwen1.trained_length(config.to_dict()) == SEQ_LENGTH
    assert qwen1.trained_length(Qwen2ForCausalLM.config_class().to_dict()) is None


# The size keys of Qwen-7B-Chat's two config.json generations, as published (the rest as in the tiny ones).
QWEN_7B_CHAT_FIRST = FIRST_RELEASE | {
    "n_embd": 4096, "n_layer": 32, "n_head": 32, "ffn_hidden_size": 22016, "kv_channels": 128,
    "vocab_size": 151936, "padded_vocab_size": 151936, "seq_length": 2048, "n_positions": 6144,
}  # fmt: skip
QWEN_7B_CHAT_LATER = LATER_RELEASE | {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 22016,
    "kv_channels": 128, "vocab_size": 151936, "seq_length": 8192, "max_position_embeddings": 32768,
}  # fmt: skip


@pytest.mark.parametrize("raw", [QWEN_7B_CHAT_FIRST, QWEN_7B_CHAT_LATER], ids=["first", "later"])
def test_qwen_7b_chat_configs_give_its_exact_size(raw):
    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen1.qwen2_config_from_qwen1(raw))
    # total_size of Qwen-7B-Chat's model.safetensors.index.json (bf16): the same tensors, no more, no fewer
    assert sum(2 * p.numel() for p in model.parameters()) == 15_442_649_088
    assert model.config.intermediate_size == 11008


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"rotary_pct": 0.5}, "rotary_pct"),
        ({"no_bias": False}, "no_bias"),
        ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
        ({"kv_channels": 8}, "kv_channels"),
        ({"padded_vocab_size": VOCAB + 64}, "padded_vocab_size"),
        ({"ffn_hidden_size": 191}, "must be even"),
        ({"n_embd": None}, "n_embd"),
    ],
)
def test_unrepresentable_configs_are_refused(change, named):
    with pytest.raises(UserError, match=named):
        qwen1.qwen2_config_from_qwen1(FIRST_RELEASE | change)


def test_every_config_problem_is_reported_at_once():
    raw = {k: v for k, v in FIRST_RELEASE.items() if k != "seq_length"} | {
        "rotary_pct": 0.25,
        "no_bias": False,
    }
    with pytest.raises(UserError) as error:
        qwen1.qwen2_config_from_qwen1(raw, file="config.json")
    assert len(error.value.problems) == 3
    assert "config.json lacks seq_length" in str(error.value)


def test_is_qwen1_checkpoint(tmp_path, checkpoint):
    assert qwen1.is_qwen1_checkpoint(checkpoint)
    assert not qwen1.is_qwen1_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    assert not qwen1.is_qwen1_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["QWenLMHeadModel"]}))
    assert qwen1.is_qwen1_checkpoint(tmp_path)


# --- sequence length


def test_warning_beyond_seq_length():
    config = qwen1.qwen2_config_from_qwen1(LATER_RELEASE).to_dict()
    assert arch.context_warning(config, SEQ_LENGTH) is None
    warning = arch.context_warning(config, SEQ_LENGTH + 1)
    assert "seq_length 32" in warning and "dynamic NTK" in warning
    assert arch.context_warning(Qwen2ForCausalLM.config_class().to_dict(), 10**6) is None


def test_the_original_differs_only_beyond_seq_length(checkpoint, weights):
    """Why the warning exists: Qwen-1's inference-time long-context tricks start right after seq_length."""
    model = qwen1.load_qwen1_model(checkpoint, dtype="fp32")
    ids = torch.randint(0, VOCAB, (1, 2 * SEQ_LENGTH), generator=torch.Generator().manual_seed(2))
    within, beyond = ids[:, :SEQ_LENGTH], ids
    original = qwen1_reference_logits(LATER_RELEASE, weights, within, long_context=True)
    assert max_diff(logits_of(model, within), original) < 1e-4
    original = qwen1_reference_logits(LATER_RELEASE, weights, beyond, long_context=True)
    assert max_diff(logits_of(model, beyond), original) > 0.1
    plain = qwen1_reference_logits(LATER_RELEASE, weights, beyond)
    assert max_diff(logits_of(model, beyond), plain) < 1e-4


# --- LoRA target names


def test_qwen1_target_names_map_onto_the_converted_modules():
    targets, applied = qwen1.map_qwen1_target_modules(["c_attn", "c_proj", "w1", "w2", "q_proj", "lm_head"])
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj", "gate_proj", "lm_head"]
    assert applied == {
        "c_attn": ["q_proj", "k_proj", "v_proj"],
        "c_proj": ["o_proj", "down_proj"],
        "w1": ["up_proj"],
        "w2": ["gate_proj"],
    }


@pytest.mark.parametrize("targets", ["all-linear", r".*\.(c_attn|w1)", ["q_proj", "v_proj"]])
def test_other_targets_pass_through(targets):
    assert qwen1.map_qwen1_target_modules(targets) == (targets, {})


def test_mapped_targets_reach_every_projection_with_peft(checkpoint):
    from peft import LoraConfig, get_peft_model

    targets, _ = qwen1.map_qwen1_target_modules(["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"])
    model = get_peft_model(qwen1.load_qwen1_model(checkpoint, dtype="fp32"), LoraConfig(target_modules=targets))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# --- tokenizer and conversion


def test_tokenizer_needs_qwen_tiktoken(tmp_path, checkpoint):
    assert qwen1.load_qwen1_tokenizer(checkpoint).convert_tokens_to_ids("<|im_end|>") == 151645
    with pytest.raises(UserError, match="qwen.tiktoken"):
        qwen1.load_qwen1_tokenizer(tmp_path)


SAMPLES = [
    "甄嬛：皇上万福。",
    "e\u0301 caf\u00e9 \uf900 \u1100\u1161",
    "x = 12345\n\n  y",
    "<|im_end|> <|im_",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, checkpoint) -> Path:
    return qwen1.convert_qwen1(checkpoint, tmp_path_factory.mktemp("converted") / "qwen2", "fp32", "200KB")


def test_convert_round_trip(converted, weights, token_ids):
    assert len(list(converted.glob("model-*.safetensors"))) > 1
    assert (converted / "model.safetensors.index.json").is_file()
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "auto_map" not in config
    assert config["qwen1_seq_length"] == SEQ_LENGTH
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    assert type(model) is Qwen2ForCausalLM
    reference = qwen1_reference_logits(LATER_RELEASE, weights, token_ids)
    assert max_diff(logits_of(model, token_ids), reference) < 1e-4
    assert model.generation_config.eos_token_id == [151645, 151643]
    assert model.generation_config.pad_token_id == 151643
    assert qwen1.trained_length(model.config.to_dict()) == SEQ_LENGTH


def test_converted_tokenizer(converted, qwen_tiktoken):
    dst = converted
    fast = PreTrainedTokenizerFast.from_pretrained(dst)
    for text in SAMPLES:
        assert fast(text)["input_ids"] == qwen_tiktoken.encode(text, allowed_special="all")
    messages = [{"role": "user", "content": "你好"}]
    assert fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # AutoTokenizer cannot load it as saved (transformers maps every qwen2 folder to Qwen2Tokenizer, which
    # adds an NFC normalizer): it gives the ids of Qwen-1's own slow tokenizer, NFC then tiktoken.
    auto = AutoTokenizer.from_pretrained(dst)
    for text in SAMPLES:
        nfc = unicodedata.normalize("NFC", text)
        assert auto(text)["input_ids"] == qwen_tiktoken.encode(nfc, allowed_special="all")
    assert auto(SAMPLES[1])["input_ids"] != fast(SAMPLES[1])["input_ids"]


def test_convert_refuses_a_non_empty_destination(tmp_path, checkpoint):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        qwen1.convert_qwen1(checkpoint, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_lora_with_the_tutorials_qwen1_names_trains(tmp_path, quantization, caplog):
    """The tutorial's target_modules (c_attn, c_proj, w1, w2) on an unconverted Qwen-1 folder, quantized, on the CPU."""
    from lowtune.recipe import run
    from tests.conftest import MEMORISE, tiny_config, write_jsonl

    vocab = 151936  # the real tokenizer's ids must fit
    config = dict(LATER_RELEASE, vocab_size=vocab, seq_length=1024, max_position_embeddings=1024)
    folder = write_checkpoint(tmp_path / "qwen1", config, qwen1_weights(vocab=vocab), "safetensors")
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE)
    run_config = tiny_config(folder, data, tmp_path / "run", max_steps=8, learning_rate=1e-2)
    run_config.model.quantization = quantization
    run_config.lora.target_modules = ["c_attn", "c_proj", "w1", "w2"]
    run_config.data.template = "seed"
    with caplog.at_level(logging.INFO, logger="lowtune"):
        output = run(run_config)
    assert "c_attn -> q_proj/k_proj/v_proj" in caplog.text
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "down_proj",
        "up_proj",
        "gate_proj",
    }
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["last_logged_loss"] < 0.8 * summary["first_logged_loss"]
