"""Model families: one module each, and this small registry that the loader, the fused LoRA path and the memory
plan all ask.

A family declares the `model_type`s it covers, its decoder's projection names, how the fused LoRA path applies to
it (the attention and MLP classes it replaces the forward of, and the forwards), and the shape the memory plan needs.
- `llama`: Llama-style decoders (Qwen2/2.5, Llama 2/3, Mistral, SmolLM);
- `qwen3`: Qwen3, Llama-style with RMSNorm on every query and key head;
- `qwen1`: not a family but a checkpoint format: Qwen-1 (Qwen-7B-Chat) folders are converted to Qwen2 on load.
A model of any other family trains through peft's own LoRA modules (and the run's log says so).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowtune.errors import Problem, UserError

log = logging.getLogger(__name__)

# The seven projections of a Llama-style decoder layer, and where each sits under `model.layers.N`.
PROJECTION_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
PROJECTIONS = tuple(PROJECTION_PATHS)
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Shape:
    """What a run's memory depends on in a Llama-style decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool = False  # Qwen3: an RMSNorm on every query and key head (their inputs are kept for backward)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder projection."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass(frozen=True)
class Family:
    """A model family lowtune knows, with the fused LoRA path that computes exactly what its own modules do."""

    name: str
    model_types: tuple[str, ...]
    attention_classes: tuple[str, ...]  # modules whose forward the fused path replaces
    mlp_classes: tuple[str, ...]
    attention_forward: Callable[..., Any]
    mlp_forward: Callable[..., Any]
    qk_norm: bool = False

    def shape(self, raw: dict[str, Any], file: str | Path | None = None) -> Shape:
        """The memory plan's shape from a config.json; every missing or malformed key is reported at once."""
        problems: list[Problem] = []
        size = _size_reader(raw, file, problems)
        hidden, heads = size("hidden_size"), size("num_attention_heads")
        kv_heads = size("num_key_value_heads", default=heads)
        head_dim = size("head_dim", default=hidden // heads if heads else 0)
        shape = Shape(
            hidden=hidden,
            intermediate=size("intermediate_size"),
            layers=size("num_hidden_layers"),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=size("vocab_size"),
            tied=bool(raw.get("tie_word_embeddings")),
            qk_norm=self.qk_norm,
        )
        if problems:
            raise UserError(problems)
        return shape

    def fused_lora_blocker(self, raw: dict[str, Any]) -> str | None:
        """Why the fused path cannot compute this model exactly, or None when it can."""
        if raw.get("attention_dropout"):
            return f"attention_dropout={raw['attention_dropout']} (the fused attention has none)"
        if raw.get("hidden_act", "silu") != "silu":
            return f"hidden_act={raw['hidden_act']} (the fused MLP computes SwiGLU)"
        return None


def _size_reader(raw: dict[str, Any], file: str | Path | None, problems: list[Problem]) -> Callable[..., int]:
    def size(key: str, default: int | None = None) -> int:
        value = raw.get(key)
        if value is None and default is not None:
            return default
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        message = f"config.json has no {key}" if value is None else f"config.json: {key}={value!r} is not a size"
        problems.append(Problem(message, file, fix="point model.path at the model's own folder and config.json"))
        return 0

    return size


def families() -> tuple[Family, ...]:
    from lowtune.model.arch import llama, qwen3

    return (llama.FAMILY, qwen3.FAMILY)


def family_named(name: str) -> Family:
    return next(family for family in families() if family.name == name)


def family_for(raw: dict[str, Any]) -> Family | None:
    """The family of a config.json (in Qwen2 terms for Qwen-1), or None for one lowtune has no fused path for."""
    model_type = raw.get("model_type")
    return next((family for family in families() if model_type in family.model_types), None)


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a model folder, in Qwen2 terms when the folder holds a Qwen-1 checkpoint."""
    from lowtune.model.arch import qwen1

    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError.one(f"cannot read config.json ({error})", path) from None
    if not isinstance(raw, dict):
        raise UserError.one("config.json is not a JSON object", path)
    return qwen1.qwen2_config_from_qwen1(raw, path).to_dict() if qwen1.is_qwen1_config(raw) else raw


def targeted_projections(targets: list[str] | str, layers: int) -> set[str]:
    """Which of the seven projections `lora.target_modules` puts an adapter on in every decoder layer.

    Names match as peft matches them (a suffix of the module's path); a string other than all-linear is a regex
    matched against full module names.
    """
    if targets == ALL_LINEAR:
        return set(PROJECTIONS)
    if isinstance(targets, str):
        pattern = re.compile(targets)

        def matches(key: str) -> bool:
            return pattern.fullmatch(key) is not None
    else:

        def matches(key: str) -> bool:
            return any(key == target or key.endswith(f".{target}") for target in targets)

    return {
        name
        for name, path in PROJECTION_PATHS.items()
        if all(matches(f"model.layers.{layer}.{path}") for layer in range(layers))
    }


def load_checkpoint(folder: Path, trust_remote_code: bool = False, **loading: Any) -> Any:
    """The model in `folder`, a Qwen-1 checkpoint converted on load, any other through `AutoModelForCausalLM`.

    `loading`: dtype, quantization_config and device_map, as `from_pretrained` takes them.
    """
    import pickle

    from transformers import AutoModelForCausalLM

    from lowtune.errors import pickled_objects_refused
    from lowtune.model.arch import qwen1

    if qwen1.is_qwen1_checkpoint(folder):
        log.info("%s is a Qwen-1 checkpoint: converting it to Qwen2 on load (no remote code)", folder)
        return qwen1.load_qwen1_model(folder, **loading)
    try:  # transformers prefers safetensors and reads .bin files with weights_only=True
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code, **loading)
    except pickle.UnpicklingError as error:
        raise pickled_objects_refused(folder, error) from None


def load_checkpoint_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder: Qwen-1's qwen.tiktoken as an exact fast tokenizer, else the saved one."""
    from transformers import AutoTokenizer

    from lowtune.model.arch import qwen1

    if qwen1.is_qwen1_checkpoint(folder):
        return qwen1.load_qwen1_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def lora_target_names(raw: dict[str, Any], targets: list[str] | str) -> tuple[list[str] | str, dict[str, list[str]]]:
    """`lora.target_modules` in the loaded model's names (a converted Qwen-1 model takes the tutorial's c_attn, w1,
    ...), and the mapping applied (empty when none), for the log."""
    from lowtune.model.arch import qwen1

    if qwen1.trained_length(raw) is None:
        return targets, {}
    return qwen1.map_qwen1_target_modules(targets)


def context_warning(raw: dict[str, Any], length: int) -> str | None:
    """Why sequences of `length` tokens compute something other than the original model, or None."""
    from lowtune.model.arch import qwen1

    trained = qwen1.trained_length(raw)
    return qwen1.beyond_seq_length(length, trained) if trained is not None and length > trained else None
