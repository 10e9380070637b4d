"""GGUF for llama.cpp and Ollama: the merged model, its tokenizer and the run's chat format in one file.

Written with the `gguf` package (llama.cpp's own writer): the architecture's metadata, every tensor under llama.cpp's
name (`gguf.get_tensor_name_map`), the BPE tokenizer (tokens, types, merges, the pre-tokenizer llama.cpp must split
with, special ids), a Jinja chat template that renders the run's chat format (`export/merge.py`), and the end of turn
as the token that ends generation. Types are what the `gguf` package quantizes itself; the K- and i-quants need
llama.cpp's `llama-quantize`, run on the f16 export.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lowtune.data.templates import ChatFormat
from lowtune.errors import Problem, UserError
from lowtune.export.merge import chat_template, merged_chat_model
from lowtune.infer.session import ChatModel
from lowtune.model.qwen_tokenizer import QWEN_PATTERN

log = logging.getLogger(__name__)

Q, FileType = gguf.GGMLQuantizationType, gguf.LlamaFileType
TYPES = {  # --type: the tensors' type, and the file type llama.cpp reports
    "f32": (Q.F32, FileType.ALL_F32),
    "f16": (Q.F16, FileType.MOSTLY_F16),
    "bf16": (Q.BF16, FileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, FileType.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, FileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, FileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, FileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, FileType.MOSTLY_Q4_0),
}
LLAMA_QUANTIZE_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
ARCHITECTURES = {  # transformers' model_type -> llama.cpp's architecture
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}
# How lowtune's tokenizers split text before BPE (tokenizer.json's pre_tokenizer, reduced to what decides the split)
# and llama.cpp's name for the same rule. transformers rebuilds a GGUF model's tokenizer (the embedded SmolLM2's
# included) with GPT-2's split, so that is what training used and what llama.cpp must use.
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Split", QWEN_PATTERN), ("ByteLevel", False)): "qwen2",
}
TOKEN_TYPES = gguf.TokenType


@dataclass(frozen=True)
class Vocabulary:
    """A BPE tokenizer as GGUF stores it: one token per embedding row, in id order."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def export_gguf(
    out: str | Path,
    gguf_type: str = "f16",
    adapter: str | Path | None = None,
    model: str | Path | None = None,
    model_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a run's model (its adapter merged into the full-precision base) or a model folder as one GGUF file.

    Args:
        out: the .gguf file to write; an existing one is replaced only with `overwrite`.
        gguf_type: one of TYPES.
        adapter: a lowtune run folder (or one of its checkpoints).
        model: a model folder instead (`lowtune merge`'s, or any Hugging Face folder of a family lowtune trains).
        model_path: the base model folder of `adapter`, when it moved since training.
        overwrite: replace an existing `out`.
    """
    out = Path(out)
    problems = type_problems(gguf_type) + source_problems(adapter, model)
    if out.exists() and not overwrite:
        problems.append(Problem("the output file exists", out, fix="choose another --out, or pass --overwrite"))
    if out.suffix != ".gguf":
        problems.append(Problem("the output should be a .gguf file", out, fix="name it MODEL.gguf"))
    if problems:
        raise UserError(problems)
    # Merged in fp32 and rounded once, to the file's type (a bf16 merge would round f16 and q8_0 weights twice).
    dtype = "bf16" if gguf_type == "bf16" else "fp32"
    if adapter is not None:
        chat_model = merged_chat_model(Path(adapter), dtype, model_path)
    else:
        chat_model = ChatModel.from_model_dir(model, precision=dtype, quantization="none")
    staging = out.with_name(f".{out.name}.partial")
    try:
        write_gguf(staging, chat_model.model, chat_model.tokenizer, chat_model.chat_format, gguf_type)
        os.replace(staging, out)  # a failed export never leaves half a file under the name
    finally:
        staging.unlink(missing_ok=True)
    size = out.stat().st_size / 1e6
    log.info("Wrote %s (%s, %.1f MB): load it with llama.cpp (llama-cli -m %s)", out, gguf_type, size, out)
    return out


def write_gguf(
    path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat, gguf_type: str
) -> None:
    """Writes `model` with `tokenizer` and a chat template of `chat_format` as a GGUF file at `path`."""
    config = model.config
    arch = _architecture(config)
    tensor_type, file_type = TYPES[gguf_type]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _write_model_metadata(writer, config, file_type)
    vocabulary = vocabulary_of(tokenizer, config.vocab_size)
    _write_tokenizer(writer, tokenizer, vocabulary, chat_format)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reads the embeddings as the output layer when there is none
    progress = {"description": f"GGUF {gguf_type}", "transient": True, "console": Console(stderr=True)}
    for name, tensor in track(state.items(), **progress):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError.one(f"{name}: no llama.cpp tensor for this weight of a {config.model_type} model")
        data = _llama_cpp_layout(name, tensor.detach().to("cpu", torch.float32).numpy(), config, arch)
        stored = _stored_type(data, tensor_type)
        writer.add_tensor(gguf_name, _encoded(data, stored), raw_dtype=stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def vocabulary_of(tokenizer: PreTrainedTokenizerBase, rows: int) -> Vocabulary:
    """The tokenizer's BPE tokens, one per embedding row (rows past the tokenizer's are unused padding)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise UserError.one(f"a {model['type']} tokenizer: lowtune writes GGUF for byte-level BPE tokenizers only")
    pre = PRE_TOKENIZERS.get(_split_rule(spec.get("pre_tokenizer")))
    normalizer = spec.get("normalizer")
    if normalizer == {"type": "NFC"}:  # Qwen2's own tokenizer.json
        log.info("The tokenizer normalizes text to NFC, llama.cpp does not: text not in NFC may split otherwise there")
    elif normalizer is not None:
        pre = None
    if pre is None:
        raise UserError.one(
            "this tokenizer normalizes or splits text before BPE in a way lowtune cannot name for llama.cpp "
            f"(normalizer {json.dumps(spec.get('normalizer'))[:100]}, pre-tokenizer "
            f"{json.dumps(spec.get('pre_tokenizer'))[:200]})",
            fix="export with --type from a model of a family lowtune trains (Qwen, Qwen3, SmolLM2)",
        )
    by_id = {index: token for token, index in model["vocab"].items()}
    types = {index: TOKEN_TYPES.NORMAL for index in by_id}
    for added in spec["added_tokens"]:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_TYPES.CONTROL if added["special"] else TOKEN_TYPES.USER_DEFINED
    if max(by_id) >= rows:
        raise UserError.one(f"the tokenizer has ids up to {max(by_id)}, the model only {rows} embedding rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(rows)]
    token_types = [int(types.get(i, TOKEN_TYPES.UNUSED)) for i in range(rows)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return Vocabulary(tokens, token_types, merges, pre)


def _split_rule(pre_tokenizer: dict | None) -> tuple:
    """What decides where a pre-tokenizer splits: each step's kind and regex (or whether ByteLevel splits itself)."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    rule = []
    for step in steps:
        if step["type"] == "Split":
            rule.append(("Split", step["pattern"].get("Regex", step["pattern"].get("String"))))
        elif step["type"] == "ByteLevel":
            if step.get("add_prefix_space"):
                return ()  # a prefix space llama.cpp's BPE does not add
            rule.append(("ByteLevel", step.get("use_regex", True)))
        else:
            rule.append((step["type"],))
    return tuple(rule)


def source_problems(adapter: str | Path | None, model: str | Path | None) -> list[Problem]:
    """What is wrong with the choice of what to export: exactly one of a run or a model folder."""
    if (adapter is None) == (model is None):
        return [Problem("give exactly one of --adapter RUN_DIR or --model MODEL_DIR")]
    return []


def type_problems(gguf_type: str) -> list[Problem]:
    """What is wrong with a --type: a type the gguf package cannot write (K-quants: with the way to get them)."""
    if gguf_type in TYPES:
        return []
    if gguf_type.lower() in LLAMA_QUANTIZE_TYPES:
        fix = (
            f"export --type f16, then quantize with llama.cpp: llama-quantize MODEL-f16.gguf MODEL-{gguf_type}.gguf "
            f"{gguf_type.upper()}"
        )
        return [Problem(f"--type {gguf_type}: the gguf package cannot write K-quants", fix=fix)]
    return [Problem(f"unknown --type {gguf_type!r}", fix="use " + ", ".join(TYPES))]


def _architecture(config: Any) -> gguf.MODEL_ARCH:
    if config.model_type not in ARCHITECTURES:
        raise UserError.one(
            f"lowtune writes GGUF for {', '.join(ARCHITECTURES)} models, not {config.model_type}",
            fix="merge with lowtune merge and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise UserError.one(f"rope scaling {rope} is not written to GGUF by lowtune yet")
    return ARCHITECTURES[config.model_type]


def _rope(config: Any) -> dict[str, Any]:
    """The rotary embedding's parameters (transformers 5 keeps them in `rope_parameters`)."""
    return dict(getattr(config, "rope_parameters", None) or {})


def _write_model_metadata(writer: gguf.GGUFWriter, config: Any, file_type: FileType) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(getattr(config, "name_or_path", "") or config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocabulary: Vocabulary, chat_format: ChatFormat
) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    writer.add_token_merges(vocabulary.merges)
    end_of_turn = chat_format.stop_token_ids[0]
    writer.add_eos_token_id(end_of_turn)  # generation ends where lowtune chat's does: at the end of the turn
    writer.add_eot_token_id(end_of_turn)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(adds_bos)
    writer.add_chat_template(chat_template(chat_format))


def _llama_cpp_layout(name: str, data: np.ndarray, config: Any, arch: gguf.MODEL_ARCH) -> np.ndarray:
    """llama.cpp's Llama rotates interleaved pairs of each head's dimensions, transformers' the two halves: the
    query and key rows are reordered so that both rotate the same pairs (Qwen rotates halves in both)."""
    if arch != gguf.MODEL_ARCH.LLAMA or not name.endswith(("q_proj.weight", "k_proj.weight")):
        return data
    heads = config.num_attention_heads if name.endswith("q_proj.weight") else config.num_key_value_heads
    half = data.shape[0] // heads // 2
    return data.reshape(heads, 2, half, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def _stored_type(data: np.ndarray, wanted: Q) -> Q:
    """Vectors (norms, biases) stay f32, as llama.cpp keeps them; a matrix whose rows do not split into the type's
    blocks falls back to f16."""
    if data.ndim == 1:
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if data.shape[-1] % block:
        log.info("rows of %d do not split into %s blocks of %d: that tensor is f16", data.shape[-1], wanted.name, block)
        return Q.F16
    return wanted


def _encoded(data: np.ndarray, stored: Q) -> np.ndarray:
    if stored == Q.F32:
        return data
    if stored == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, stored)
