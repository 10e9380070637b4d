"""Qwen-1 checkpoints (Qwen-7B-Chat and its kin) loaded natively as Qwen2, with no remote code.

Qwen-1 is Qwen2's architecture under other names (checked against Qwen-7B-Chat's `modeling_qwen.py`):

| Qwen-1 (`transformer.` prefix)              | Qwen2 (`model.` prefix)                          |
|---------------------------------------------|--------------------------------------------------|
| `wte`                                       | `embed_tokens`                                   |
| `h.N.ln_1`, `h.N.ln_2` (RMSNorm)            | `layers.N.input_layernorm`, `post_attention_...` |
| `h.N.attn.c_attn` (q, k, v stacked, biased) | `layers.N.self_attn.q_proj`, `k_proj`, `v_proj`  |
| `h.N.attn.c_proj` (no bias)                 | `layers.N.self_attn.o_proj`                      |
| `h.N.mlp.w2`: `c_proj(w1(x) * silu(w2(x)))` | `layers.N.mlp.gate_proj` (the one under silu)    |
| `h.N.mlp.w1`                                | `layers.N.mlp.up_proj`                           |
| `h.N.mlp.c_proj`                            | `layers.N.mlp.down_proj`                         |
| `ln_f`, `lm_head`                           | `norm`, `lm_head`                                |

The two give the same logits up to the checkpoint's `seq_length`. Beyond it, the original switches on
dynamic NTK rotary scaling and log-n attention scaling at inference (`use_dynamic_ntk`, `use_logn_attn`),
which Qwen2 does not do: `beyond_seq_length` says so. Two training-time details are not reproduced
either: the first release's embedding dropout (`embd_pdrop`: 0.1), and its attention ignoring the padding
mask (harmless with right padding).

Design: the state dict is converted here and given to `from_pretrained(None, config=..., state_dict=...)`,
which keeps bitsandbytes quantization at load, rather than through transformers' `WeightConverter`/`Chunk`
registry, which is process-global (peft reads it too) and makes `save_pretrained` write Qwen-1 names back.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from lowtune.errors import Problem, UserError, pickled_objects_refused
from lowtune.model.qwen_tokenizer import TIKTOKEN_FILE_NAME, build_qwen_tokenizer

CONFIG_FILE_NAME = "config.json"
GENERATION_CONFIG_FILE_NAME = "generation_config.json"
SAFETENSORS_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645  # fixed in qwen.tiktoken's special range
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Config keys of both Qwen-1 releases: the first (n_embd, ...) and the later one (hidden_size, ...).
SIZE_KEYS = {
    "hidden_size": ("hidden_size", "n_embd"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "ffn_size": ("intermediate_size", "ffn_hidden_size"),  # twice the MLP width: w1 and w2 side by side
}
# Settings Qwen2 hard-codes; a checkpoint that changes them is a different architecture.
FIXED_SETTINGS = {
    "rotary_pct": 1.0,
    "no_bias": True,
    "apply_residual_connection_post_layernorm": False,
    "pos_emb": "rotary",
    "activation": "swiglu",
}

# Qwen-1 name -> Qwen2 name, per layer (after `transformer.h.N.`) and for the rest of the model.
LAYER_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",  # w1(x) multiplies silu(w2(x)): the up projection
    "mlp.w2.weight": "mlp.gate_proj.weight",  # w2(x) goes through silu: the gate
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
TOP_RENAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
FUSED_QKV = "attn.c_attn."  # + weight | bias: rows are all of q, then all of k, then all of v
# Per-layer buffers some Qwen-1 checkpoints saved (causal mask, rotary frequencies); Qwen2 recomputes them.
IGNORED_BUFFERS = {"attn.bias", "attn.masked_bias", "attn.rotary_emb.inv_freq"}
LAYER_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)")

# LoRA targets written in Qwen-1 names -> the converted modules (peft matches names as suffixes).
QWEN1_TARGET_NAMES: dict[str, list[str]] = {
    "c_attn": ["q_proj", "k_proj", "v_proj"],
    "c_proj": ["o_proj", "down_proj"],
    "w1": ["up_proj"],
    "w2": ["gate_proj"],
    "attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.c_proj": ["self_attn.o_proj"],
    "mlp.c_proj": ["mlp.down_proj"],
    "mlp.w1": ["mlp.up_proj"],
    "mlp.w2": ["mlp.gate_proj"],
}
# Settings worth keeping from the checkpoint's generation_config.json (the rest serves its remote code).
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


def is_qwen1_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` holds a Qwen-1 checkpoint."""
    path = Path(folder) / CONFIG_FILE_NAME
    return path.is_file() and is_qwen1_config(_read_json(path))


def is_qwen1_config(raw: dict[str, Any]) -> bool:
    """Whether a config.json describes a Qwen-1 model (model_type qwen, or a QWenLMHeadModel)."""
    return raw.get("model_type") == "qwen" or "QWenLMHeadModel" in (raw.get("architectures") or [])


def qwen2_config_from_qwen1(raw: dict[str, Any], file: str | Path | None = None) -> Qwen2Config:
    """The Qwen2 config that computes what a Qwen-1 config.json describes.

    Args:
        raw: the checkpoint's config.json, parsed.
        file: where it came from, for error messages.

    Returns:
        A Qwen2Config; `qwen1_seq_length` holds the original training length (`trained_length`).

    Raises:
        UserError: listing every key Qwen2 cannot represent exactly, or a size the config lacks.
    """
    problems = _unrepresentable(raw, file)
    sizes = {name: _size(raw, keys, file, problems) for name, keys in SIZE_KEYS.items()}
    seq_length = _size(raw, ("seq_length",), file, problems)
    vocab_size = _size(raw, ("vocab_size",), file, problems)
    problems += _shape_problems(raw, sizes, vocab_size, file)
    if problems:
        raise UserError(problems)
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["ffn_size"] // 2,
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_attention_heads"],
        hidden_act="silu",
        max_position_embeddings=seq_length,  # as far as Qwen2 computes what Qwen-1 computes
        rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(raw.get("rotary_emb_base", 10000))},
        attention_dropout=float(raw.get("attn_dropout_prob", raw.get("attn_pdrop", 0.0))),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        use_sliding_window=False,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        # No pad_token_id: Qwen2 would make it the embedding's padding_idx, which Qwen-1 does not have.
        qwen1_seq_length=seq_length,
    )


def _unrepresentable(raw: dict[str, Any], file: str | Path | None) -> list[Problem]:
    problems = []
    for key, value in FIXED_SETTINGS.items():
        if key in raw and raw[key] is not None and raw[key] != value:
            problems.append(
                Problem(
                    f"{key}={raw[key]!r}: Qwen2 only computes {key}={value!r}",
                    file,
                    fix="this checkpoint is not a Qwen-7B-style Qwen-1 model; load it with its own code",
                )
            )
    return problems


def _size(raw: dict[str, Any], keys: tuple[str, ...], file: str | Path | None, problems: list[Problem]) -> int:
    """The first of `keys` that the config has, as a positive int; a problem (and 0) when none is usable."""
    for key in keys:
        if key in raw:
            value = raw[key]
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
            problems.append(Problem(f"{key}={value!r} must be a positive integer", file))
            return 0
    problems.append(Problem("config.json lacks " + " / ".join(keys), file, fix="restore the checkpoint's config.json"))
    return 0


def _shape_problems(
    raw: dict[str, Any], sizes: dict[str, int], vocab_size: int, file: str | Path | None
) -> list[Problem]:
    """Shapes Qwen-1 allows in its config but Qwen2 (or Qwen-1's own code) cannot follow."""
    problems = []
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    if hidden and heads and hidden % heads:
        problems.append(Problem(f"hidden size {hidden} is not a multiple of the {heads} heads", file))
    kv_channels = raw.get("kv_channels")
    if kv_channels is not None and hidden and heads and kv_channels * heads != hidden:
        problems.append(
            Problem(f"kv_channels={kv_channels}: Qwen2 needs kv_channels x heads == hidden size ({hidden})", file)
        )
    if sizes["ffn_size"] % 2:
        problems.append(Problem(f"the MLP size {sizes['ffn_size']} must be even (w1 and w2 are half each)", file))
    padded = raw.get("padded_vocab_size")
    if padded is not None and vocab_size and padded != vocab_size:
        problems.append(
            Problem(
                f"padded_vocab_size={padded} differs from vocab_size={vocab_size}: the embedding "
                "and the head would differ in size, which Qwen2 cannot represent",
                file,
            )
        )
    return problems


def read_qwen1_weights(folder: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by its Qwen-1 name (safetensors preferred, else .bin; sharded or not).

    .bin files are read with `torch.load(weights_only=True)`: a file holding anything but tensors is refused
    and nothing in it is executed. Floating tensors are cast to `dtype` as they are read (one copy in memory).
    """
    weights: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(folder)):
        for name, tensor in _read_weight_file(path).items():
            weights[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return weights


def _weight_files(folder: Path) -> list[Path]:
    for suffix, index in ((".safetensors", SAFETENSORS_INDEX), (".bin", BIN_INDEX)):
        if (folder / index).is_file():
            return _indexed_files(folder / index)
        files = sorted(folder.glob(f"*{suffix}"))
        if files:
            return files
    raise UserError.one(
        f"no weights: no *.safetensors, no *.bin, no {SAFETENSORS_INDEX} or {BIN_INDEX}",
        folder,
        fix="point model.path at the folder that holds the checkpoint's weight files",
    )


def _indexed_files(index: Path) -> list[Path]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError.one("the index has no weight_map", index, fix="restore the checkpoint's index file")
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise UserError.one(
            "shards named by the index are missing: " + ", ".join(missing),
            index,
            fix="download the whole checkpoint",
        )
    return files


def _read_weight_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise pickled_objects_refused(path, error) from None
    bad = (
        [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
        if isinstance(state, dict)
        else ["<the file itself>"]
    )
    if bad:
        raise UserError.one(
            "not a weight file: entries that are not tensors: " + ", ".join(map(str, bad[:5])),
            path,
            fix="use the checkpoint's original weight files",
        )
    return state


def qwen2_state_dict_from_qwen1(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames Qwen-1 tensors to Qwen2's and splits each fused c_attn into q, k and v.

    Names it does not know pass through unchanged, so that loading reports them as unexpected.
    """
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        converted.update(_convert_one(name, tensor))
    return converted


def _convert_one(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if name in TOP_RENAMES:
        yield TOP_RENAMES[name], tensor
        return
    match = LAYER_KEY.fullmatch(name)
    if match is None:
        yield name, tensor
        return
    prefix, rest = f"model.layers.{match[1]}.", match[2]
    if rest in IGNORED_BUFFERS:
        return
    if rest.startswith(FUSED_QKV):
        kind = rest[len(FUSED_QKV) :]  # weight or bias
        for projection, part in zip(("q_proj", "k_proj", "v_proj"), split_fused_qkv(tensor), strict=True):
            yield f"{prefix}self_attn.{projection}.{kind}", part
    else:
        yield prefix + LAYER_RENAMES.get(rest, rest), tensor


def split_fused_qkv(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """c_attn's output (3 x hidden rows; bias: 3 x hidden values) -> q, k, v, as Qwen-1 splits it."""
    if tensor.shape[0] % 3:
        raise UserError.one(f"a c_attn tensor of shape {tuple(tensor.shape)} does not split into q, k and v")
    return tuple(part.contiguous() for part in tensor.chunk(3, dim=0))


def load_qwen1_model(
    folder: str | Path,
    *,
    dtype: torch.dtype | str,
    quantization_config: Any = None,
    device_map: str | dict[str, Any] | None = None,
) -> Qwen2ForCausalLM:
    """Loads a Qwen-1 checkpoint as a Qwen2ForCausalLM, never running code from the folder.

    Args:
        folder: the checkpoint (config.json, weights; qwen.tiktoken for the tokenizer).
        dtype: torch dtype or fp32/fp16/bf16, for the weights bitsandbytes does not quantize.
        quantization_config: a transformers `BitsAndBytesConfig` (8-bit or 4-bit), or None.
        device_map: as for `from_pretrained`.

    Raises:
        UserError: for a config Qwen2 cannot represent, or weights that do not fit it (every mismatch listed).
    """
    folder = Path(folder)
    config = qwen2_config_from_qwen1(_read_json(folder / CONFIG_FILE_NAME), folder / CONFIG_FILE_NAME)
    torch_dtype = resolve_dtype(dtype)
    weights = qwen2_state_dict_from_qwen1(read_qwen1_weights(folder, torch_dtype))
    _check_weights_fit(weights, config, folder)
    model = Qwen2ForCausalLM.from_pretrained(
        None,
        config=config,
        state_dict=weights,
        dtype=torch_dtype,
        quantization_config=quantization_config,
        device_map=device_map,
    )
    model.generation_config = qwen1_generation_config(folder)
    return model


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype, or one of lowtune's precision names (fp32, fp16, bf16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError.one(f"unknown dtype {dtype!r}", fix="use one of " + ", ".join(DTYPES))
    return DTYPES[dtype]


def _check_weights_fit(weights: dict[str, torch.Tensor], config: Qwen2Config, folder: Path) -> None:
    """Compares names and shapes with the model the config builds, before loading: `from_pretrained` would
    only warn about a missing tensor and leave it random."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Qwen2ForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    problems = [Problem(f"missing tensor {name}", folder) for name in expected if name not in weights]
    problems += [
        Problem(f"unexpected tensor {name} (not part of a Qwen-1 model)", folder)
        for name in weights
        if name not in expected
    ]
    problems += [
        Problem(f"{name} has shape {tuple(weights[name].shape)}, config.json implies {shape}", folder)
        for name, shape in expected.items()
        if name in weights and tuple(weights[name].shape) != shape
    ]
    if problems:
        raise UserError(problems)


def qwen1_generation_config(folder: str | Path) -> GenerationConfig:
    """Stops at <|im_end|> (a chat turn's end) or <|endoftext|>, pads with <|endoftext|>; keeps the
    checkpoint's sampling settings."""
    path = Path(folder) / GENERATION_CONFIG_FILE_NAME
    saved = _read_json(path) if path.is_file() else {}
    sampling = {key: saved[key] for key in SAMPLING_KEYS if key in saved}
    return GenerationConfig(
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        pad_token_id=ENDOFTEXT_ID,
        bos_token_id=ENDOFTEXT_ID,
        **sampling,
    )


def load_qwen1_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """The checkpoint's qwen.tiktoken as an exact fast tokenizer (see `lowtune.model.qwen_tokenizer`)."""
    path = Path(folder) / TIKTOKEN_FILE_NAME
    if not path.is_file():
        raise UserError.one(
            f"no {TIKTOKEN_FILE_NAME}: a Qwen-1 checkpoint ships its vocabulary there",
            folder,
            fix=f"copy {TIKTOKEN_FILE_NAME} from the original Qwen-7B-Chat into this folder",
        )
    return build_qwen_tokenizer(path)


def trained_length(raw: dict[str, Any]) -> int | None:
    """A converted Qwen-1 model's training length (`qwen1_seq_length` in its Qwen2 config); None for other models."""
    return raw.get("qwen1_seq_length")


def beyond_seq_length(length: int, trained: int) -> str:
    return (
        f"max length {length} is beyond this Qwen-1 checkpoint's seq_length {trained}: past it the original model "
        "applies dynamic NTK rotary scaling and log-n attention scaling at inference, which the converted "
        "Qwen2 model does not, so long inputs give other results than the original (and training on them "
        "teaches positions the checkpoint never saw)"
    )


def map_qwen1_target_modules(targets: list[str] | str) -> tuple[list[str] | str, dict[str, list[str]]]:
    """LoRA target names in Qwen-1 terms -> the converted model's modules.

    A string (`all-linear`, or a regex over full module names) passes through unchanged, as do names that are
    not Qwen-1's. One LoRA on the fused c_attn becomes three (q, k, v), each of the same rank.

    Returns:
        The targets to give peft, and the mapping that was applied (empty if none), for the caller to log.
    """
    if isinstance(targets, str):
        return targets, {}
    mapped: list[str] = []
    applied: dict[str, list[str]] = {}
    for name in targets:
        replacement = QWEN1_TARGET_NAMES.get(name)
        if replacement is not None:
            applied[name] = list(replacement)
        mapped += [target for target in replacement or [name] if target not in mapped]
    return mapped, applied


def convert_qwen1(
    src: str | Path, dst: str | Path, dtype: torch.dtype | str = "bf16", max_shard_size: int | str = "5GB"
) -> Path:
    """Writes `src` (a Qwen-1 checkpoint) to `dst` as a plain Qwen2 folder that needs lowtune no more.

    `dst` gets safetensors shards, config.json, generation_config.json (stopping at <|im_end|> or
    <|endoftext|>) and the tokenizer (tokenizer.json with the ChatML template). Load that tokenizer with
    `PreTrainedTokenizerFast.from_pretrained` for tiktoken's ids: `AutoTokenizer` builds a Qwen2Tokenizer,
    which NFC-normalizes text first (as Qwen-1's own slow tokenizer does, and tiktoken does not).
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise UserError.one("the destination is not empty", dst, fix="give a new or empty folder")
    tokenizer = load_qwen1_tokenizer(src)
    model = load_qwen1_model(src, dtype=dtype)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(dst, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(dst)
    except BaseException:
        shutil.rmtree(dst)  # half a model folder would load with random weights later
        raise
    return dst


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError.one("file not found", path, fix="is this a model folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError.one(f"not valid JSON ({error})", path) from None
    if not isinstance(data, dict):
        raise UserError.one("expected a JSON object", path)
    return data
