"""The one config schema of lowtune: defaults, then a YAML file, then dotted overrides; validated once.

Every field carries its documentation; `lowtune config` prints it (see the README's config reference).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from lowtune.errors import Problem, UserError

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
PrecisionSetting = Literal["auto", "fp32", "fp16", "bf16"]
BUILTIN_DATA_PREFIX = "builtin:"
CONFIG_FILE_NAME = "lowtune.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


FOUR_BIT_SETTINGS = ("quant_type", "double_quant", "compute_dtype")


class ModelSettings(_Section):
    path: str | None = Field(
        None,
        description="Local folder of a causal LM (Hugging Face layout, or a Qwen-1 checkpoint such as Qwen-7B-Chat). "
        "Empty: the embedded SmolLM2-135M-Instruct, which needs no download.",
    )
    precision: PrecisionSetting = Field(
        "auto",
        description="dtype of the weights that are not quantized (embeddings, norms, head; all of them "
        "with quantization: none) and of the computation. auto: bf16 where the device computes it natively (a GPU "
        "of compute capability 8.0 or more; a CPU with AVX512-BF16 or AMX), fp16 with loss scaling on older GPUs, "
        "fp32 on CPUs without native bf16.",
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="Load the linear layers through bitsandbytes: 8-bit (LLM.int8) or 4-bit (QLoRA)."
    )
    quant_type: Literal["nf4", "fp4"] | None = Field(None, description="4-bit data type (4bit only); empty: nf4.")
    double_quant: bool | None = Field(
        None, description="Quantize the 4-bit scales too (QLoRA's double quantization; 4bit only); empty: true."
    )
    compute_dtype: Precision | None = Field(
        None, description="dtype of the 4-bit matmuls (4bit only); empty: the resolved precision."
    )
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential", "cpu"] = Field(
        "auto",
        description="Where the layers go (accelerate's device maps); auto: one GPU if there is one, else CPU.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow transformers to run Python code shipped in the model folder. Off by default: "
        "lowtune loads Qwen-1 natively and never needs it.",
    )

    @model_validator(mode="after")
    def _four_bit_settings_only_for_4bit(self) -> ModelSettings:
        if self.quantization != "4bit":
            given = [name for name in FOUR_BIT_SETTINGS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} applies to quantization: 4bit only (here {self.quantization})")
        return self

    def updated(self, **changes: Any) -> ModelSettings:
        """A copy with `changes`, validated like the YAML (pydantic's model_copy would skip validation)."""
        try:
            return ModelSettings.model_validate(self.model_dump() | changes)
        except ValidationError as error:
            source = "settings " + ", ".join(f"{key}={value!r}" for key, value in changes.items())
            raise UserError([_problem_from(e, source, {}) for e in error.errors()]) from None


LoraVariant = Literal["lora", "dora", "rslora"]
LoraInit = Literal["default", "pissa", "olora", "loftq"]
BASE_CHANGING_INITS = ("pissa", "olora")  # they subtract their starting product from the base weights


class LoraSettings(_Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Layers that get adapters: a list of module names (Qwen-1 names such as c_attn, w1 work too), "
        "a regex matched against full module names, or all-linear.",
    )

    variant: LoraVariant = Field(
        "lora",
        description="lora: W + (alpha / r) B A. rslora: the same with the scale alpha / sqrt(r), which keeps the "
        "update's size as r grows (rank-stabilised LoRA; at equal alpha a larger update: lower the learning rate "
        "or alpha). "
        "dora: the update's direction by LoRA and each output row's length by a trained magnitude vector (weight-"
        "decomposed LoRA); more memory and time a step, peft's own modules (no fused LoRA), not on 8bit.",
    )
    init: LoraInit = Field(
        "default",
        description="How the adapters start. default: A random, B zero (the update starts at nothing). pissa: A and B "
        "from the base weight's largest singular directions, which the base then gives up (unquantized bases "
        "only). olora: the same from a QR decomposition (unquantized bases only). loftq: A and B that make up "
        "for the 4-bit quantization error, from the model's unquantized safetensors weights (quantization: 4bit "
        "only). pissa and olora adapters are saved as plain LoRA of rank 2r that applies to the untouched base.",
    )

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: list[str] | str) -> list[str] | str:
        if not value:
            raise ValueError("must name at least one module (or say all-linear)")
        return value

    @model_validator(mode="after")
    def _dora_starts_by_default(self) -> LoraSettings:
        if self.variant == "dora" and self.init != "default":
            raise ValueError(
                f"lora.init {self.init} with lora.variant dora: DoRA takes its magnitudes from the starting weights, "
                "and peft converts (pissa, olora) or sets (loftq) only A and B; set lora.init: default, or "
                "lora.variant: lora or rslora"
            )
        return self

    def quantization_problem(self, quantization: str) -> str | None:
        """Why `init` cannot start adapters on a base quantized as `quantization`, or None."""
        if self.init in BASE_CHANGING_INITS and quantization != "none":
            return (
                f"lora.init {self.init} moves the adapters' starting part out of the base weights (W - s B A), and a "
                f"{quantization} base cannot hold that residual exactly: peft re-quantizes it (olora) or refuses "
                "(pissa), and the adapter saved for the original base would no longer reproduce the trained model; "
                "set model.quantization: none, or lora.init: loftq (4bit) or default"
            )
        if self.variant == "dora" and quantization == "8bit":
            return (
                "lora.variant dora on an 8bit base: peft's DoRA dequantizes the LLM.int8 weight through its "
                "quantization state, after which bitsandbytes' next 8-bit product finds no row scales (it fails at "
                "the second step, peft 0.22, bitsandbytes 0.50); set model.quantization: 4bit or none, or "
                "lora.variant: lora or rslora"
            )
        if self.init == "loftq" and quantization != "4bit":
            return (
                f"lora.init loftq makes up for the 4-bit quantization error, and this base is {quantization} "
                "(peft's LoftQ for a loaded model covers bitsandbytes 4-bit only); set model.quantization: 4bit, "
                "or lora.init: default"
            )
        return None


# The record formats and the canonical column names of each: what `columns` of a data.files entry may map.
RecordFormat = Literal["auto", "alpaca", "chat", "sharegpt"]
FileType = Literal["auto", "json", "jsonl", "csv", "tsv", "parquet", "datasets"]
CANONICAL_COLUMNS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "chat": ("messages", "role", "content"),  # role and content: the keys inside each message
    "sharegpt": ("conversations", "from", "value", "system"),  # from and value: the keys inside each turn
}


class DataFile(_Section):
    """One data file with how to read it; a plain string in data.files is a DataFile with only its path."""

    path: str = Field(description="The file, a folder written by datasets' save_to_disk, or builtin:NAME.")
    type: FileType = Field(
        "auto",
        description="File type; auto: from the extension (.json, .jsonl, .csv, .tsv, .parquet), a folder is a "
        "save_to_disk folder (of a DatasetDict: its train split).",
    )
    format: RecordFormat = Field("auto", description="Record format; auto: data.format, or detected from the keys.")
    columns: dict[str, str] = Field(
        {},
        description="The file's names for the canonical fields: {canonical: the file's column}. alpaca: "
        "instruction, input, output, system, history; chat: messages, and role, content inside each message; "
        "sharegpt: conversations, system, and from, value inside each turn.",
    )
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(
        {},
        description="The file's role names (chat, sharegpt) besides the usual ones: {its name: system, user or "
        "assistant}, e.g. {customer: user, agent: assistant}.",
    )
    weight: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Mixtures: the share of this file's records to draw (above 0, at most 1), without replacement, "
        "with train.seed; empty: every record (not with samples).",
    )
    samples: int | None = Field(
        None,
        gt=0,
        description="Mixtures: how many of this file's records to draw, without replacement, with train.seed (at "
        "most the file's record count); empty: every record (not with weight).",
    )

    @model_validator(mode="before")
    @classmethod
    def _a_string_is_a_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        fmt = info.data.get("format", "auto")
        formats = [fmt] if fmt != "auto" else list(CANONICAL_COLUMNS)
        allowed = list(dict.fromkeys(name for each in formats for name in CANONICAL_COLUMNS[each]))
        unknown = [name for name in columns if name not in allowed]
        if unknown:
            where = f"format {fmt}" if fmt != "auto" else "alpaca, chat and sharegpt"
            raise ValueError(f"unknown field {', '.join(unknown)}; the fields of {where}: {', '.join(allowed)}")
        return columns

    @model_validator(mode="after")
    def _roles_of_conversations(self) -> DataFile:
        if self.roles and self.format == "alpaca":
            raise ValueError("roles apply to the chat and sharegpt formats, not alpaca")
        return self

    @field_validator("samples")
    @classmethod
    def _one_way_to_draw(cls, samples: int | None, info: ValidationInfo) -> int | None:
        weight = info.data.get("weight")
        if samples is not None and weight is not None:
            raise ValueError(f"weight {weight:g} and samples {samples} both given: a file is drawn one way")
        return samples

    @model_serializer(mode="wrap")
    def _only_the_path_as_a_string(self, handler: Any) -> Any:
        fields = DataFile.model_fields.items()
        only_path = all(getattr(self, name) == field.default for name, field in fields if name != "path")
        return self.path if only_path else handler(self)

    def __str__(self) -> str:
        return self.path


class DataSettings(_Section):
    files: list[DataFile] = Field(
        default_factory=lambda: [DataFile(path=f"{BUILTIN_DATA_PREFIX}huanhuan")],
        description="Training files: paths, or mappings {path, type, format, columns, roles, weight, samples} (see "
        "data.files entries). JSON, JSONL, CSV, TSV, Parquet or a datasets save_to_disk folder, holding alpaca "
        "(instruction, input, output[, system, history]), chat (messages) or sharegpt (conversations) records. "
        "builtin:huanhuan is the bundled Chat-甄嬛 set.",
    )
    format: RecordFormat = Field(
        "auto", description="Record format of the files that do not state theirs; auto: told by each record's keys."
    )
    template: Literal["auto", "qwen", "seed", "tokenizer"] = Field(
        "auto",
        description="Prompt format. tokenizer: the model's own Jinja chat template; qwen: Qwen's ChatML "
        "(make_context); seed: the Qwen-7B-Chat tutorial's process_func, token for token; auto: tokenizer if the "
        "model has a template, else qwen.",
    )
    system: str | None = Field(
        None, description="System prompt for records that have none; empty: the template's own default."
    )
    max_length: int = Field(
        1024,
        gt=0,
        description="Longest encoded record in tokens; longer ones are cut at "
        "the end, and dropped if no trained token is left.",
    )
    truncation: Literal["cut", "error"] = Field(
        "cut",
        description="Records longer than max_length: cut at the end (the tutorial's way; a record left with no "
        "trained token is dropped and counted), or stop with the file and line of each.",
    )
    val_size: float = Field(
        0.0,
        ge=0,
        description="Records held out for evaluation: a share (below 1; one that rounds to no record, or to all of "
        "them, holds out nothing) or a count (a whole number below the number of records), drawn with train.seed "
        "(not with eval_files).",
    )
    eval_files: list[DataFile] = Field([], description="Evaluation files (given as files are) instead of val_size.")

    @field_validator("val_size")
    @classmethod
    def _a_count_is_whole(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"{value:g} is neither a share (below 1) nor a count of records (a whole number)")
        return value


# Train settings that say the same thing two ways: a run gives one of each pair.
ALTERNATIVES = (("epochs", "max_steps"), ("batch_size", "tokens_per_batch"))


class TrainSettings(_Section):
    method: Literal["sft", "dpo", "orpo"] = Field(
        "sft",
        description="What the run learns. sft: the replies of the records (alpaca, chat or sharegpt). dpo: Direct "
        "Preference Optimization on preference records ({prompt or messages, chosen, rejected}), the reference "
        "being the starting model (the base with the adapter off, or train.init_adapter), its log-probabilities "
        "computed once before training. orpo: Odds Ratio Preference Optimization on the same records (the chosen "
        "reply's loss plus an odds-ratio term; no reference).",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="DPO's beta: how far the policy may move from the reference (dpo only); empty: 0.1.",
    )
    orpo_lambda: float | None = Field(
        None, gt=0, description="ORPO's lambda: the weight of the odds-ratio term (orpo only); empty: 0.1."
    )
    init_adapter: str | None = Field(
        None,
        description="A lowtune run folder (or checkpoint) whose adapter is the trainable starting point, e.g. an SFT "
        "adapter to run DPO on; its lora settings must equal this run's. Empty: a fresh adapter.",
    )
    epochs: float | None = Field(
        None, gt=0, description="Passes over the data; empty: 1, or as many as max_steps takes (not both)."
    )
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (not with epochs).")
    batch_size: int | None = Field(
        None, gt=0, description="Records per micro-batch; empty: 8, or as tokens_per_batch fills it (not both)."
    )
    tokens_per_batch: int | None = Field(
        None,
        gt=0,
        description="Fill each micro-batch up to this many tokens instead of a fixed record count (not with "
        "batch_size).",
    )
    gradient_accumulation: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    merge_micro_batches: bool | Literal["auto"] = Field(
        "auto",
        description="Run the micro-batches of one optimizer step as one batch: the same records and the same "
        "gradient in fewer passes over the model (small steps are bound by the host, not the GPU). auto: for packed "
        "batches, when the memory plan shows the merged batch fits with no more recomputation; false: accumulate "
        "as configured; true: always (needs gradient_accumulation above 1).",
    )
    cuda_graphs: bool | Literal["auto"] = Field(
        "auto",
        description="Replay each micro-batch's forward and backward pass from a CUDA graph (one capture per row "
        "length, rows padded to a multiple of 128 tokens): small steps stop waiting for the host. auto: on CUDA for "
        "packed rows with varlen attention and lowtune's fused LoRA, micro-batches up to 4,096 tokens, one process, "
        "no fp16 loss scaling (offloaded checkpoints are copied inside the graph), SFT (DPO and ORPO steps only with "
        "true, until measured on a GPU); true where it cannot apply is an error.",
    )
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Concatenate each micro-batch into one row with no padding, positions restarting per record and "
        "no attention across records. auto: on for CUDA, off on the CPU (padded batches).",
    )
    attention: Literal["auto", "lowtune_varlen", "flex_attention", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel. auto: torch's varlen flash attention for packed rows on CUDA "
        "(lowtune_varlen); SDPA with a block-diagonal mask for packed rows elsewhere; eager for short padded rows "
        "on the CPU (faster there); SDPA otherwise.",
    )
    fused_lora: bool | Literal["auto"] = Field(
        "auto",
        description="Compute each decoder layer's q/k/v, o, gate/up and down LoRA projections as four fused functions "
        "(the llama and qwen3 families, with LoRA on all seven projections). auto: wherever it applies; true where "
        "it cannot apply is an error.",
    )
    liger: bool | Literal["auto"] = Field(
        "auto",
        description="liger-kernel's RMSNorm, RoPE and SwiGLU kernels and its fused linear cross-entropy (CUDA). auto: "
        "on CUDA when it is installed; false: none of them; true where it cannot apply (CPU, not installed) is an "
        "error.",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapters.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool | Literal["auto", "offload"] = Field(
        "auto",
        description="Recompute each decoder layer in the backward pass instead of keeping its activations. true: "
        "the layer inputs kept for that stay on the GPU; offload: they wait in pinned host memory, copied on a side "
        "stream while the GPU computes (GPU only); false: keep every activation. "
        "auto: off when the run fits in 90% of the GPU without it, else only as many of the first layers as make it "
        "fit (the last ones keep their activations), their inputs offloaded when the host has room for them; off "
        "on the CPU.",
    )
    logging_steps: int = Field(10, gt=0, description="Log loss and learning rate every N steps.")
    eval_steps: int | None = Field(
        None,
        gt=0,
        description="Evaluate on the held-out records every N steps (empty: at logging_steps x 5, and at "
        "the end; only with data.val_size or data.eval_files).",
    )
    save_steps: int = Field(100, ge=0, description="Write a checkpoint every N steps (0: only at the end).")
    save_total_limit: int | None = Field(3, gt=0, description="Keep at most this many checkpoints.")
    seed: int = Field(42, description="Seed for adapter initialisation, dropout and data order.")

    @model_validator(mode="after")
    def _preference_settings_of_their_method(self) -> TrainSettings:
        for name, method in (("beta", "dpo"), ("orpo_lambda", "orpo")):
            if getattr(self, name) is not None and self.method != method:
                raise ValueError(f"train.{name} applies to train.method: {method} only (here {self.method})")
        return self

    @model_validator(mode="after")
    def _one_way_to_say_each(self) -> TrainSettings:
        for first, second in ALTERNATIVES:
            if getattr(self, first) is not None and getattr(self, second) is not None:
                raise ValueError(f"give {first} or {second}, not both")
        return self


class RunConfig(_Section):
    """A whole lowtune run: what to load, how to adapt it, on what data, how to train, where to write."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    output_dir: str = Field("runs/lowtune", description="Folder that receives checkpoints, adapter and reports.")

    @model_validator(mode="after")
    def _lora_init_fits_the_quantization(self) -> RunConfig:
        problem = self.lora.quantization_problem(self.model.quantization)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _a_starting_adapter_is_the_start(self) -> RunConfig:
        if self.train.init_adapter and self.lora.init != "default":
            raise ValueError(
                f"train.init_adapter and lora.init {self.lora.init} both say how the adapters start: the saved "
                "adapter's weights replace what the init computed (and pissa or olora would have changed the base "
                "under it); drop lora.init or train.init_adapter"
            )
        return self

    @model_validator(mode="after")
    def _evaluation_needs_held_out_records(self) -> RunConfig:
        if self.data.eval_files and self.data.val_size:
            raise ValueError("data.val_size and data.eval_files both say what to hold out: give one")
        if self.train.eval_steps is not None and not (self.data.eval_files or self.data.val_size):
            raise ValueError("train.eval_steps needs held-out records: set data.val_size or data.eval_files")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Builds the run config: defaults < YAML file < `section.key=value` overrides; raises UserError."""
    raw: dict[str, Any] = {}
    key_lines: dict[tuple[str, ...], int] = {}
    if path is not None:
        raw, key_lines = _read_yaml(Path(path))
    for override in overrides or []:
        _apply_override(raw, override)
    return _validated(raw, str(path) if path else "<defaults>", key_lines)


def settings_from_overrides(overrides: list[str]) -> dict[str, Any]:
    """The nested settings that `section.key=value` overrides give (what `lowtune studio`'s form sends), before
    validation: what a config file holding only those would say."""
    raw: dict[str, Any] = {}
    for override in overrides:
        _apply_override(raw, override)
    return raw


def validate_settings(raw: dict[str, Any], source: str) -> RunConfig:
    """`raw` as a RunConfig; raises the UserError that `lowtune train` gives for the same settings."""
    return _validated(raw, source, {})


def load_run_config(folder: str | Path) -> RunConfig:
    """The config a run or checkpoint folder was trained with (its lowtune.yaml).

    Folders written before `precision: auto` (lowtune 0.1) saved every default, some of which now contradict each
    other (quant_type with no 4-bit, epochs beside max_steps): those defaults are dropped, so old runs still load.
    """
    path = Path(folder) / CONFIG_FILE_NAME
    raw, key_lines = _read_yaml(path)
    for section, key, old_default, unless in LEGACY_DEFAULTS:
        values = raw.get(section) if isinstance(raw.get(section), dict) else {}
        if values.get(key) == old_default and unless(values):
            del values[key]
    return _validated(raw, str(path), key_lines)


# Defaults lowtune 0.1 saved into every lowtune.yaml, each with the condition under which it now contradicts.
LEGACY_DEFAULTS = (
    ("model", "quant_type", "nf4", lambda model: model.get("quantization") != "4bit"),
    ("model", "double_quant", True, lambda model: model.get("quantization") != "4bit"),
    ("train", "epochs", 1.0, lambda train: train.get("max_steps") is not None),
    ("train", "batch_size", 8, lambda train: train.get("tokens_per_batch") is not None),
)


def _validated(raw: dict[str, Any], source: str, key_lines: dict[tuple[str, ...], int]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError([_problem_from(e, source, key_lines) for e in error.errors()]) from None


def save_config(config: RunConfig, folder: str | Path) -> Path:
    target = Path(folder) / CONFIG_FILE_NAME
    target.write_text(config.to_yaml(), encoding="utf-8")
    return target


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    if not path.is_file():
        raise UserError.one(
            "config file not found",
            path,
            fix="give the path of a YAML file, e.g. examples/huanhuan-qlora.yaml",
        )
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise UserError.one("config file is not UTF-8 text", path) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise UserError.one(f"not valid YAML: {getattr(error, 'problem', error)}", path, line) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError.one("the config must be a mapping of sections (model, lora, data, train, output_dir)", path)
    return data, _key_lines(node)


def _key_lines(node: yaml.Node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Line (1-based) of every key in a YAML mapping tree, list items by their index, so errors can point at it."""
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        children = [(str(key_node.value), key_node, value_node) for key_node, value_node in node.value]
    elif isinstance(node, yaml.SequenceNode):
        children = [(str(index), item, item) for index, item in enumerate(node.value)]
    else:
        return lines
    for name, key_node, value_node in children:
        key = prefix + (name,)
        lines[key] = key_node.start_mark.line + 1
        lines.update(_key_lines(value_node, key))
    return lines


def _apply_override(raw: dict[str, Any], override: str) -> None:
    dotted, sep, value_text = override.partition("=")
    keys = dotted.strip().split(".")
    if not sep or not all(keys):
        raise UserError.one(
            f"override {override!r} is not of the form section.key=value",
            fix="e.g. --set train.learning_rate=1e-4",
        )
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text
    target = raw
    for key in keys[:-1]:
        child = target.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError.one(f"override {override!r}: {key} is not a section")
        target = child
    target[keys[-1]] = value
    if keys[0] == "train" and len(keys) == 2 and value is not None:
        _drop_alternative(target, keys[1])


def _drop_alternative(train: dict[str, Any], key: str) -> None:
    """An override of max_steps replaces the file's epochs (and each pair alike): the later word wins."""
    for pair in ALTERNATIVES:
        if key in pair:
            other = pair[1 - pair.index(key)]
            if train.pop(other, None) is not None:
                log.info("train.%s given: train.%s from the file no longer applies", key, other)


def _problem_from(error: dict[str, Any], source: str, key_lines: dict[tuple[str, ...], int]) -> Problem:
    # pydantic reports union members as extra path parts ("list[str]", "literal['auto']"): cut them off.
    parts = [part for part in error["loc"] if isinstance(part, int) or "[" not in part]
    location = tuple(str(part) for part in parts)
    message = error["msg"].removeprefix("Value error, ")
    if not location:  # a check across sections: it names the keys it is about, the first one locates it
        named = re.search(r"\b(model|lora|data|train)\.(\w+)", message)
        location = (named[1], named[2]) if named else ()
        return Problem(message, source, _line_of(location, key_lines))
    line = _line_of(location, key_lines)
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")
    if error["type"] == "extra_forbidden":
        message = f"unknown key {key!r}"
        return Problem(message, source, line, fix=_known_keys_hint(parts))
    return Problem(f"{key}: {message}", source, line, fix=FIELD_FIXES.get(str(parts[-1])))


MIX_FIX = "give a file weight: W (a share above 0 and at most 1 of its records) or samples: N (a count), not both"
# The fix printed under a schema error of these fields (other fields' messages say what is allowed).
FIELD_FIXES = {"weight": MIX_FIX, "samples": MIX_FIX}


def _line_of(location: tuple[str, ...], key_lines: dict[tuple[str, ...], int]) -> int | None:
    line = None
    for depth in range(len(location), 0, -1):
        line = key_lines.get(location[:depth])
        if line is not None:
            break
    return line


def _known_keys_hint(location: list[str | int]) -> str:
    model: type[BaseModel] = RunConfig
    for part in location[:-1]:
        if isinstance(part, int):  # an item of a list of sections (data.files): the section is the list's
            continue
        annotation = model.model_fields[part].annotation
        annotation = next(iter(get_args(annotation)), annotation) if get_origin(annotation) is list else annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return "known keys here: " + ", ".join(model.model_fields)


def reference_markdown() -> str:
    """The config reference (README section), generated from the schema so the two never disagree."""
    lines = []
    for section, field in RunConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += [f"**{section}**", ""] + _key_table(annotation) + [""]
        else:
            lines += [f"**{section}**: {field.description} Default `{field.default}`.", ""]
        if annotation is DataSettings:
            lines += ["**data.files entries** (and data.eval_files): a path, or a mapping of these keys", ""]
            lines += _key_table(DataFile) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _key_table(section: type[BaseModel]) -> list[str]:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, sub in section.model_fields.items():
        default = "required"
        if not sub.is_required():
            default = _show(TypeAdapter(sub.annotation).dump_python(sub.get_default(call_default_factory=True)))
        lines.append(f"| `{key}` | `{default}` | {sub.description} |")
    return lines


def _show(value: Any) -> str:
    if value is None:
        return "empty"
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()
