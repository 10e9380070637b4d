"""Every choice a run leaves open, decided in one place: the validated config and the machine in, one record out.

`resolve_run` turns a `RunConfig`, a `Machine` (`lowtune/machine.py`), the model's config.json and the encoded
lengths into a frozen `Resolved`: precision and the 4-bit compute dtype, device map, model family and LoRA targets,
fused LoRA, each liger-kernel part, the loss kernel, how the frozen base products are computed, packing, attention,
batching and gradient checkpointing (from the memory plan). Each choice is logged once with its reason, saved as
`resolved.yaml` in the run folder and in every checkpoint (resume compares it), and printed by `lowtune plan`.
Every other module reads the record; none decides again.

A setting the user made that cannot apply here (liger-kernel on a CPU, fused LoRA on a family without a fused path,
offloaded checkpoints without a GPU, ...) is a `UserError` naming why, raised before any weight is loaded.
`resolve_loading` is the loading part alone, for chat, serve, eval and merge.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from lowtune.config import BASE_CHANGING_INITS, LoraSettings, ModelSettings, RunConfig
from lowtune.data.pack import padded_length
from lowtune.errors import Problem, UserError
from lowtune.machine import Machine
from lowtune.model import arch
from lowtune.model.arch import PROJECTIONS, Family, Shape
from lowtune.model.attention import EAGER_ON_CPU_UP_TO, VARLEN
from lowtune.model.checkpointing import Checkpointing
from lowtune.model.load import Loading
from lowtune.train.graphs import BUCKET as GRAPH_BUCKET
from lowtune.train.memory import (
    GIB,
    GLIBC_HEAP_KEEPS,
    GLIBC_MMAP_CEILING,
    PRECISION_BYTES,
    MemoryPlan,
    RunShape,
    host_share,
    largest_batch_tokens,
    linear_weights,
)

log = logging.getLogger(__name__)

RESOLVED_FILE_NAME = "resolved.yaml"
LIGER_PARTS = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")
DEFAULT_BATCH_SIZE = 8
# CUDA graphs from this micro-batch size down: at ~1,200 tokens the H200 was busy 21% of an eager step and a graph
# replayed the pass 4.2x faster; at 16,384 it was busy 97.7% (bench/NOTES.md), with nothing for a graph to remove.
GRAPHS_UP_TO_TOKENS = 4096
GPU_BUDGET = 0.9  # share of the GPU's memory a run may plan to use
DENSE_COPY_SHARE = 0.25  # the cached dense base weights may take this share of the available host memory
BF16_ON_AVX2_SLOWDOWN = "~30x"  # a bf16 matrix product against fp32 on a CPU without native bf16 (docs/quality.md)
OFF = Checkpointing("off")


DEFAULT_BETA, DEFAULT_ORPO_LAMBDA = 0.1, 0.1  # DPO's beta (the DPO paper's), ORPO's lambda (TRL's default)


@dataclass(frozen=True)
class Objective:
    """A preference method and its weight: DPO's beta, or ORPO's lambda."""

    method: str  # "dpo" or "orpo"
    weight: float

    @classmethod
    def of(cls, train: Any) -> Objective:
        if train.method == "dpo":
            return cls("dpo", train.beta if train.beta is not None else DEFAULT_BETA)
        return cls("orpo", train.orpo_lambda if train.orpo_lambda is not None else DEFAULT_ORPO_LAMBDA)

    @property
    def needs_reference(self) -> bool:
        return self.method == "dpo"

    def describe(self) -> str:
        if self.method == "dpo":
            return f"DPO, beta {self.weight:g}, reference: the starting model's log-probabilities, computed once"
        return f"ORPO, lambda {self.weight:g} (chosen reply's loss + lambda x odds-ratio loss; no reference)"


@dataclass(frozen=True)
class Batching:
    """What one micro-batch and one optimizer step hold: as configured, and how many configured micro-batches run
    together as one (`merged`)."""

    records: int | None  # records per configured micro-batch; None when filled by tokens
    tokens: int | None  # the token budget of a configured micro-batch
    accumulation: int  # configured micro-batches per optimizer step
    packed: bool
    largest: int  # tokens in the largest batch that runs in the first epoch (padding included when padded)
    merged: int = 1  # configured micro-batches run as one batch (a divisor of accumulation)

    @property
    def passes(self) -> int:
        """Forward and backward passes per optimizer step."""
        return self.accumulation // self.merged

    def describe(self) -> str:
        size = f"{self.records} records" if self.records else f"up to {self.tokens:,} tokens"
        rows = "packed into one row" if self.packed else "padded, similar lengths together"
        merged = f", run {self.merged} at a time" if self.merged > 1 else ""
        return f"{size} per micro-batch ({rows}), {self.accumulation} per step{merged}; largest {self.largest:,} tokens"


@dataclass(frozen=True)
class Resolved:
    """The run's choices (see the module docstring); `reasons` says why each was made."""

    method: str  # "sft", "dpo" or "orpo" (train.method)
    objective: Objective | None  # the preference loss and its weight (dpo, orpo)
    machine: str
    device: str  # "cuda:N" or "cpu"
    loading: Loading
    family: str | None  # the model/arch family; None: peft's own LoRA modules
    lora_targets: list[str] | str
    fused_lora: bool
    liger: tuple[str, ...]  # the liger-kernel parts in use (LIGER_PARTS)
    loss: str  # "chunked", "masked", "liger" or "transformers"
    base_weights: str  # the fused groups' frozen weights: "per use" (dequantized when needed) or "cached"
    onednn: bool  # the cached base products through oneDNN
    packing: bool
    attention: str
    batching: Batching
    checkpointing: Checkpointing
    length: str  # "N steps" or "N epochs"
    chat_format: str
    cuda_graphs: bool = False  # each micro-batch's pass replayed from a CUDA graph (train/graphs.py)
    lora_variant: str = "lora, init default"  # lora.variant and lora.init, as peft applies them
    remake_down: bool = True  # the fused MLP makes down's input again in its backward pass (GroupKernels)
    reasons: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    plan: MemoryPlan | None = None

    @property
    def autocast(self) -> str | None:
        """Trainer's mixed precision: bf16, fp16 (with loss scaling, CUDA only) or none."""
        precision = self.loading.precision
        if precision == "bf16" or (precision == "fp16" and self.device != "cpu"):
            return precision
        return None

    @property
    def method_text(self) -> str:
        """The method, with its weight for a preference one: "sft", "dpo (0.1)"."""
        return self.method if self.objective is None else f"{self.method} ({self.objective.weight:g})"

    def choices(self) -> dict[str, Any]:
        """Every choice as plain values (what resolved.yaml holds and resume compares)."""
        return {
            "method": self.method_text,
            "device": self.device,
            "precision": self.loading.precision,
            "autocast": self.autocast or "none",
            "loading": {k: v for k, v in asdict(self.loading).items() if k != "precision"}
            | {"device_map": _device_map_text(self.loading.device_map)},
            "family": self.family or "none (peft's LoRA modules)",
            "lora_targets": self.lora_targets,
            "lora_variant": self.lora_variant,
            "fused_lora": self.fused_lora,
            "liger": list(self.liger),
            "loss": self.loss,
            "base_weights": self.base_weights,
            "onednn": self.onednn,
            "packing": self.packing,
            "attention": self.attention,
            "batching": asdict(self.batching),
            "gradient_checkpointing": self.checkpointing.describe(self.plan.layers if self.plan else None),
            "down_input": "made again in the backward pass" if self.fused_lora and self.remake_down else "kept",
            "cuda_graphs": self.cuda_graphs,
            "length": self.length,
            "chat_format": self.chat_format,
        }

    def to_yaml(self) -> str:
        record = {"machine": self.machine, "choices": self.choices(), "reasons": self.reasons}
        if self.warnings:
            record["warnings"] = list(self.warnings)
        if self.plan is not None:
            record["memory_plan_gib"] = self.plan.summary()
        return yaml.safe_dump(record, sort_keys=False, allow_unicode=True, width=120)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / RESOLVED_FILE_NAME
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    def log(self) -> None:
        """One line per choice, with its reason; the warnings after them."""
        for name, value in self.choices().items():
            reason = self.reasons.get(name)
            log.info("%s: %s%s", name.replace("_", " "), _show(value), f" ({reason})" if reason else "")
        if self.plan is not None:
            where = "CPU" if self.device == "cpu" else self.machine
            log.info("planned peak %s %.2f GiB (%s)", self.plan.memory.split(" (")[0], self.plan.total / GIB, where)
        for warning in self.warnings:
            log.warning("%s", warning)

    def table(self) -> Table:
        table = Table(title=f"Resolved for {self.machine}", show_header=False, title_justify="left")
        for name, value in self.choices().items():
            table.add_row(name.replace("_", " "), _show(value), self.reasons.get(name, ""))
        return table


def read_saved_choices(folder: str | Path) -> dict[str, Any] | None:
    """The choices a run or checkpoint folder recorded, or None for one written before resolved.yaml existed."""
    path = Path(folder) / RESOLVED_FILE_NAME
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8"))["choices"]


class _Decisions:
    """Collects the reasons, warnings and impossible settings while `resolve_run` decides."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.warnings: list[str] = []
        self.problems: list[Problem] = []

    def why(self, name: str, reason: str) -> None:
        self.reasons[name] = reason

    def also(self, name: str, reason: str) -> None:
        """A second reason for the same choice."""
        self.reasons[name] = f"{self.reasons[name]}; {reason}" if name in self.reasons else reason

    def refuse(self, message: str, fix: str) -> None:
        self.problems.append(Problem(message, fix=fix))

    def raise_problems(self) -> None:
        if self.problems:
            raise UserError(self.problems)


def resolve_loading(settings: ModelSettings, machine: Machine, decisions: _Decisions | None = None) -> Loading:
    """Precision, 4-bit details and device map for loading `settings`' model on `machine`."""
    decisions = decisions or _Decisions()
    on_gpu = machine.cuda and settings.device_map != "cpu"
    precision = _precision(settings, machine, on_gpu, decisions)
    if settings.quantization != "none" and not machine.has("bitsandbytes"):
        decisions.refuse(
            f"quantization {settings.quantization} needs bitsandbytes, which is not installed",
            "pip install 'lowtune[quant]', or set model.quantization: none",
        )
    four_bit = settings.quantization == "4bit"
    if four_bit:
        compute = settings.compute_dtype or precision
        decisions.why("loading", f"4-bit {settings.quant_type or 'nf4'}, products in {compute}")
    device_map = _device_map(settings, machine, on_gpu, decisions)
    decisions.raise_problems()
    return Loading(
        precision=precision,
        quantization=settings.quantization,
        quant_type=(settings.quant_type or "nf4") if four_bit else "nf4",
        double_quant=settings.double_quant is not False if four_bit else True,
        compute_dtype=(settings.compute_dtype or precision) if four_bit else None,
        device_map=device_map,
        fsdp=machine.fsdp and four_bit,
    )


def _precision(settings: ModelSettings, machine: Machine, on_gpu: bool, decisions: _Decisions) -> str:
    asked = settings.precision
    if on_gpu:
        gpu = machine.gpu
        if asked == "auto":
            chosen = "bf16" if gpu.native_bf16 else "fp16"
            decisions.why(
                "precision",
                f"{gpu.name} computes bf16 natively"
                if gpu.native_bf16
                else f"{gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]}) has no bf16: fp16 "
                "with loss scaling",
            )
            return chosen
        if "bf16" in (asked, settings.compute_dtype) and not gpu.native_bf16:
            decisions.refuse(f"this GPU ({gpu.name}) has no bf16", "set model.precision: auto (fp16) or fp32")
        decisions.why("precision", "model.precision")
        return asked
    cpu = machine.cpu
    if asked == "auto":
        if cpu.native_bf16:
            decisions.why("precision", f"the CPU computes bf16 natively: {cpu.describe()}")
            return "bf16"
        decisions.why(
            "precision",
            f"the CPU has no native bf16 ({cpu.describe()}): a bf16 matrix product there is {BF16_ON_AVX2_SLOWDOWN} "
            "slower than fp32",
        )
        return "fp32"
    if "bf16" in (asked, settings.compute_dtype) and not cpu.native_bf16:
        decisions.warnings.append(
            f"model.precision bf16 on a CPU without native bf16 ({cpu.describe()}): its bf16 matrix products run "
            f"{BF16_ON_AVX2_SLOWDOWN} slower than fp32 (precision: auto picks fp32 here)"
        )
    if asked == "fp16":
        decisions.warnings.append("model.precision fp16 on the CPU: fp16 weights, fp32 adapters, no autocast")
    decisions.why("precision", "model.precision")
    return asked


def _device_map(settings: ModelSettings, machine: Machine, on_gpu: bool, decisions: _Decisions) -> Any:
    if machine.fsdp:
        decisions.why("device", "FSDP places and shards the model")
        return None
    if not on_gpu:
        if settings.device_map not in ("auto", "cpu"):
            decisions.refuse(
                f"model.device_map {settings.device_map} spreads the model over GPUs, and this machine has none",
                "set model.device_map: auto",
            )
        decisions.why("device", "model.device_map cpu" if settings.device_map == "cpu" else "no CUDA device")
        return {"": "cpu"}
    if settings.device_map == "auto":
        # One whole model per process: Trainer (and torchrun/accelerate) then own the placement.
        decisions.why("device", f"{machine.gpu.name}, the whole model on this process's GPU")
        return {"": machine.local_rank}
    decisions.why("device", f"model.device_map {settings.device_map}")
    return settings.device_map


def resolve_run(
    config: RunConfig, machine: Machine, model_config: dict[str, Any], lengths: list[int], chat_format: str
) -> Resolved:
    """Every choice of the run `config` describes, on `machine`; raises UserError for settings that cannot apply.

    Args:
        config: the validated run config.
        machine: what this machine can run.
        model_config: the model's config.json (in Qwen2 terms for Qwen-1, see `arch.read_model_config`).
        lengths: the encoded training records' token counts.
        chat_format: the chat format's name (decided from the tokenizer by `data/templates.py`).
    """
    decisions = _Decisions()
    train = config.train
    loading = resolve_loading(config.model, machine, decisions)
    device = "cpu" if loading.device_map == {"": "cpu"} else f"cuda:{machine.local_rank}"
    on_gpu = device != "cpu"
    family = arch.family_for(model_config)
    targets, mapping = arch.lora_target_names(model_config, config.lora.target_modules)
    if mapping:
        decisions.why("lora_targets", "Qwen-1 names: " + ", ".join(f"{k} -> {'/'.join(v)}" for k, v in mapping.items()))
    shape = family.shape(model_config) if family else None
    lora_variant = _lora_variant(config.lora, decisions)
    fused = _fused_lora(train.fused_lora, family, model_config, shape, targets, config.lora.variant, decisions)
    head_trains = isinstance(targets, list) and "lm_head" in targets
    liger = _liger(train.liger, machine, on_gpu, family, head_trains, decisions)
    packing = _packing(train.packing, on_gpu, decisions)
    attention = _attention(train.attention, machine, on_gpu, packing, max(lengths), decisions)
    batching = _batching(train, packing, lengths, decisions)
    preference = train.method != "sft"
    objective = Objective.of(train) if preference else None
    decisions.why("method", objective.describe() if objective else "supervised fine-tuning on the records' replies")
    if preference and head_trains:
        decisions.refuse(
            f"train.method: {train.method} needs a frozen output layer (the log-probabilities come from hidden "
            "states); lora.target_modules trains lm_head",
            "drop lm_head from lora.target_modules",
        )
    graphs = _cuda_graphs(train, on_gpu, packing, attention, fused, head_trains, loading, batching, decisions)
    compute = loading.compute_dtype or loading.precision
    base_weights, onednn = _base_products(fused, on_gpu, shape, compute, machine, decisions)
    warning = arch.context_warning(model_config, max(lengths))
    if warning:
        decisions.warnings.append(warning)
    loss = _loss(head_trains, liger, graphs, preference, decisions)
    run_shape = None
    if shape is not None:
        run_shape = RunShape(
            shape=shape,
            quantization=loading.quantization,
            precision=loading.precision,
            double_quant=loading.double_quant,
            rank=config.lora.r,
            targets=frozenset(arch.targeted_projections(targets, shape.layers)),
            tokens=batching.largest,
            dropout=config.lora.dropout,
            fused=fused,
            dora=config.lora.variant == "dora",
            loss=loss,
            dense_copy_bytes=_dense_copy_bytes(shape, compute) if base_weights == "cached" else 0,
            device=device if on_gpu else "cpu",
            glibc_heap=not on_gpu and _glibc_heap(machine),
            row_length=max(lengths),
            attention=attention,
        )
    if graphs and train.merge_micro_batches == "auto":
        decisions.why(
            "merge_micro_batches",
            "CUDA graphs replay each micro-batch at the GPU's pace: merged would only raise the peak",
        )
    else:
        batching = _merge(train, batching, lengths, machine, on_gpu, run_shape, decisions)
    if graphs:
        # the plan counts the padding
        batching = replace(batching, largest=padded_length(batching.largest, GRAPH_BUCKET))
    if run_shape is not None:
        run_shape = replace(run_shape, tokens=batching.largest)
    checkpointing, plan = _checkpointing(train.gradient_checkpointing, machine, on_gpu, run_shape, decisions)
    remake_down = True
    if fused and run_shape is not None:
        remake_down, plan = _down_input(checkpointing, plan, machine, on_gpu, run_shape, decisions)
    if plan is not None and not on_gpu:
        plan = replace(plan, freed=_freed_text(machine))
    if graphs or preference:
        liger = tuple(part for part in liger if part != "fused_linear_cross_entropy")
    decisions.raise_problems()
    length = f"{train.max_steps} steps" if train.max_steps else f"{train.epochs or 1:g} epochs"
    return Resolved(
        method=train.method,
        objective=objective,
        machine=machine.describe(),
        device=device,
        loading=loading,
        family=family.name if family else None,
        lora_targets=targets,
        lora_variant=lora_variant,
        fused_lora=fused,
        liger=liger,
        loss=loss,
        base_weights=base_weights,
        onednn=onednn,
        packing=packing,
        attention=attention,
        batching=batching,
        checkpointing=checkpointing,
        length=length,
        cuda_graphs=graphs,
        remake_down=remake_down,
        chat_format=chat_format,
        reasons=decisions.reasons,
        warnings=tuple(decisions.warnings),
        plan=plan,
    )


def _fused_lora(
    setting: bool | str,
    family: Family | None,
    model_config: dict[str, Any],
    shape: Shape | None,
    targets: list[str] | str,
    variant: str,
    decisions: _Decisions,
) -> bool:
    if setting is False:
        decisions.why("fused_lora", "train.fused_lora: false (peft's own LoRA forward)")
        return False
    blocker = None
    if variant == "dora":
        blocker = (
            "lora.variant dora rescales each output row by its magnitude over the norm of W + s B A, which the "
            "fused functions do not compute"
        )
    elif family is None:
        blocker = f"model_type {model_config.get('model_type')!r} is not a family lowtune has a fused path for"
    else:
        blocker = family.fused_lora_blocker(model_config)
        missing = set(PROJECTIONS) - arch.targeted_projections(targets, shape.layers)
        if blocker is None and missing:
            blocker = f"it needs adapters on all seven projections of every layer; none on {', '.join(sorted(missing))}"
    if blocker is None:
        decisions.why("fused_lora", f"{family.name} family: q/k/v, o, gate/up and down each one fused function")
        return True
    if setting is True:
        decisions.refuse(f"train.fused_lora: true cannot apply: {blocker}", "set train.fused_lora: auto")
    decisions.why("fused_lora", f"peft's own LoRA forward: {blocker}")
    return False


def _lora_variant(lora: LoraSettings, decisions: _Decisions) -> str:
    """lora.variant and lora.init in a few words; the reason says what they make of the scale and the start."""
    scale = lora.alpha / lora.r ** (0.5 if lora.variant == "rslora" else 1)
    form = "alpha / sqrt(r)" if lora.variant == "rslora" else "alpha / r"
    reason = f"scale {form} = {scale:g}"
    if lora.variant == "dora":
        reason += "; a trained magnitude per output row of each adapted layer (DoRA)"
    if lora.init in BASE_CHANGING_INITS:
        reason += f"; {lora.init} moves its start out of the base weights, saved as plain LoRA of rank {2 * lora.r}"
    elif lora.init == "loftq":
        reason += "; A and B make up for the 4-bit quantization error (LoftQ, from the safetensors weights)"
    decisions.why("lora_variant", reason)
    return f"{lora.variant}, init {lora.init}"


def _liger(
    setting: bool | str, machine: Machine, on_gpu: bool, family: Family | None, head_trains: bool, decisions: _Decisions
) -> tuple[str, ...]:
    if setting is False:
        decisions.why("liger", "train.liger: false")
        return ()
    blocker = None
    if not on_gpu:
        blocker = "liger-kernel's kernels are Triton GPU kernels, and this run is on the CPU"
    elif not machine.has("liger_kernel"):
        blocker = "liger-kernel is not installed (pip install 'lowtune[cuda]')"
    elif family is None:
        blocker = "lowtune applies liger-kernel to the families it knows (llama, qwen3)"
    if blocker is not None:
        if setting is True:
            decisions.refuse(f"train.liger: true cannot apply: {blocker}", "set train.liger: auto")
        decisions.why("liger", blocker)
        return ()
    parts = LIGER_PARTS if not head_trains else LIGER_PARTS[:-1]
    decisions.why(
        "liger", "CUDA with liger-kernel installed" + ("; the head trains, so no fused loss" if head_trains else "")
    )
    return parts


def _loss(head_trains: bool, liger: tuple[str, ...], graphs: bool, preference: bool, decisions: _Decisions) -> str:
    if head_trains:
        decisions.why("loss", "transformers' own: the output layer trains")
        return "transformers"
    if preference:
        where = "every position, unlabelled ones weighing zero: fixed shapes for CUDA graphs" if graphs else "labelled"
        decisions.why("loss", f"per-token log-probabilities from hidden states, a chunk at a time ({where}), per reply")
        return "masked" if graphs else "chunked"
    if graphs:
        decisions.why(
            "loss",
            "chunked linear cross-entropy over every position, unlabelled ones masked: fixed shapes "
            "for the CUDA graph (liger's waits for the GPU to count the labels)",
        )
        return "masked"
    if "fused_linear_cross_entropy" in liger:
        decisions.why("loss", "liger-kernel's fused linear cross-entropy from hidden states (no logits kept)")
        return "liger"
    decisions.why("loss", "chunked linear cross-entropy from hidden states: only labelled positions, a chunk at a time")
    return "chunked"


def _cuda_graphs(
    train: Any,
    on_gpu: bool,
    packed: bool,
    attention: str,
    fused: bool,
    head_trains: bool,
    loading: Loading,
    batching: Batching,
    decisions: _Decisions,
) -> bool:
    """Whether each pass replays from a CUDA graph."""
    setting = train.cuda_graphs
    if setting is False:
        decisions.why("cuda_graphs", "train.cuda_graphs: false")
        return False
    blocker = None
    if not on_gpu:
        blocker = "CUDA graphs need CUDA, and this run is on the CPU"
    elif not packed or attention != VARLEN:
        blocker = "they need packed rows with lowtune_varlen attention (fixed shapes, no mask read back to the host)"
    elif not fused:
        blocker = "they are measured with lowtune's fused LoRA groups, not peft's own LoRA modules"
    elif head_trains:
        blocker = "the output layer trains: transformers' loss selects labelled positions, a shape set by the data"
    elif loading.precision == "fp16":
        blocker = "fp16 scales the loss for each backward pass outside the captured graph"
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        blocker = "several processes: DDP reduces gradients through hooks that a captured backward skips"
    if blocker is not None:
        if setting is True:
            decisions.refuse(f"train.cuda_graphs: true cannot apply: {blocker}", "set train.cuda_graphs: auto")
        decisions.why("cuda_graphs", blocker)
        return False
    if setting == "auto" and train.method != "sft":
        decisions.why(
            "cuda_graphs",
            "preference steps replay from CUDA graphs only when asked (train.cuda_graphs: true) until they are "
            "measured on a GPU (bench/NOTES.md)",
        )
        return False
    largest = batching.largest
    if setting == "auto" and largest > GRAPHS_UP_TO_TOKENS:
        decisions.why(
            "cuda_graphs",
            f"micro-batches of up to {largest:,} tokens keep the GPU busy on their own (graphs from "
            f"{GRAPHS_UP_TO_TOKENS:,} down)",
        )
        return False
    decisions.why(
        "cuda_graphs",
        "train.cuda_graphs: true"
        if setting is True
        else f"micro-batches of up to {largest:,} tokens are bound by the "
        f"host: each pass replays from a CUDA graph (rows padded to a multiple of {GRAPH_BUCKET} tokens)",
    )
    return True


def _packing(setting: bool | str, on_gpu: bool, decisions: _Decisions) -> bool:
    if setting != "auto":
        decisions.why("packing", "train.packing")
        return bool(setting)
    if on_gpu:
        decisions.why("packing", "CUDA: varlen attention makes one packed row free of padding and masks")
        return True
    decisions.why("packing", "CPU: padded batches of similar lengths (no varlen attention kernel on the CPU)")
    return False


def _attention(setting: str, machine: Machine, on_gpu: bool, packed: bool, longest: int, decisions: _Decisions) -> str:
    varlen = on_gpu and machine.varlen_attention
    if setting == VARLEN and not (packed and varlen):
        decisions.refuse(
            "train.attention lowtune_varlen needs CUDA, torch.nn.attention.varlen and packing",
            "set train.attention: auto",
        )
    if setting != "auto":
        decisions.why("attention", "train.attention")
        return setting
    if packed:
        if varlen:
            decisions.why("attention", "torch varlen flash attention over the packed records' boundaries")
            return VARLEN
        decisions.why("attention", "SDPA with a block-diagonal mask from the packed position ids")
        return "sdpa"
    if not on_gpu and longest <= EAGER_ON_CPU_UP_TO:
        decisions.why("attention", f"on the CPU eager is faster than SDPA for rows up to {EAGER_ON_CPU_UP_TO} tokens")
        return "eager"
    decisions.why("attention", "SDPA on padded rows")
    return "sdpa"


def _batching(train: Any, packed: bool, lengths: list[int], decisions: _Decisions) -> Batching:
    records = train.batch_size or (DEFAULT_BATCH_SIZE if train.tokens_per_batch is None else None)
    largest = largest_batch_tokens(lengths, records or 1, train.tokens_per_batch, packed, train.seed)
    if train.batch_size is None and train.tokens_per_batch is None:
        decisions.why("batching", f"train.batch_size empty: {DEFAULT_BATCH_SIZE} records")
    return Batching(records, train.tokens_per_batch, train.gradient_accumulation, packed, largest)


def _merge(
    train: Any,
    batching: Batching,
    lengths: list[int],
    machine: Machine,
    on_gpu: bool,
    run_shape: RunShape | None,
    decisions: _Decisions,
) -> Batching:
    """How many of a step's micro-batches run as one: the gradient is the same (the loss is summed over the step's
    targets and divided by their count either way), and each pass over the model costs the host the same launches
    whatever its size."""
    setting, accumulation = train.merge_micro_batches, batching.accumulation
    if setting is False or accumulation == 1:
        if setting is True:
            decisions.refuse(
                "train.merge_micro_batches: true cannot apply: train.gradient_accumulation is 1, so each step is one "
                "micro-batch already",
                "set train.merge_micro_batches: auto, or raise train.gradient_accumulation",
            )
        if setting is False:
            decisions.also("batching", "train.merge_micro_batches: false")
        return batching
    if setting is True:
        decisions.also("batching", "train.merge_micro_batches: true")
        return _merged(batching, lengths, train.seed, accumulation)
    if not batching.packed:
        decisions.also(
            "batching", "padded micro-batches are not merged: each record would be padded to the step's longest"
        )
        return batching
    if run_shape is None:
        decisions.also("batching", "no memory plan for this model family to show that merged micro-batches fit")
        return batching
    budget = GPU_BUDGET * machine.gpu.memory if on_gpu else host_share(machine.host_memory_available)
    alone, _ = _checkpointing(train.gradient_checkpointing, machine, on_gpu, run_shape, _Decisions())
    layers = run_shape.shape.layers
    for merge in (m for m in range(accumulation, 1, -1) if accumulation % m == 0):
        candidate = _merged(batching, lengths, train.seed, merge)
        together, plan = _checkpointing(
            train.gradient_checkpointing, machine, on_gpu, replace(run_shape, tokens=candidate.largest), _Decisions()
        )
        if plan.total <= budget and together.checkpointed(layers) <= alone.checkpointed(layers):
            decisions.why(
                "batching",
                f"{merge} micro-batches run as one: the same records and gradient in fewer passes; planned peak "
                f"{plan.total / GIB:.1f} GiB of a {budget / GIB:.1f} GiB budget, no more layers recomputed",
            )
            return candidate
    decisions.also("batching", "micro-batches accumulated: merged, they would not fit without more recomputation")
    return batching


def _merged(batching: Batching, lengths: list[int], seed: int, merge: int) -> Batching:
    largest = largest_batch_tokens(lengths, batching.records or 1, batching.tokens, batching.packed, seed, merge)
    return replace(batching, merged=merge, largest=largest)


def _dense_copy_bytes(shape: Shape, compute: str) -> int:
    return linear_weights(shape) * PRECISION_BYTES[compute]


def _base_products(
    fused: bool, on_gpu: bool, shape: Shape | None, compute: str, machine: Machine, decisions: _Decisions
) -> tuple[str, bool]:
    if not fused:
        decisions.why("base_weights", "peft's modules compute their own base products")
        return "per use", False
    if on_gpu:
        decisions.why("base_weights", "GPU: dequantized when used (a dense copy would undo the quantization's saving)")
        return "per use", False
    dense = _dense_copy_bytes(shape, compute)
    room = DENSE_COPY_SHARE * machine.host_memory_available
    if dense > room:
        decisions.why(
            "base_weights",
            f"dequantized when used: a dense copy ({dense / GIB:.2f} GiB) would not fit in "
            f"{DENSE_COPY_SHARE:.0%} of the free host memory",
        )
        return "per use", False
    decisions.why(
        "base_weights",
        f"CPU: each group's weights dequantized once into one {compute} matrix ({dense / GIB:.2f} GiB of host "
        "memory), not in every forward and backward",
    )
    onednn = compute == "fp32" and machine.cpu.mkl_fp32_is_slow and machine.mkl and machine.onednn
    if onednn:
        decisions.why(
            "onednn",
            f"MKL would run its SSE code for fp32 products on this CPU ({machine.cpu.vendor or 'unknown'}"
            f"{', MKL_ENABLE_INSTRUCTIONS=' + machine.cpu.mkl_cap if machine.cpu.mkl_cap else ''}); oneDNN uses AVX2",
        )
    elif compute == "fp32":
        decisions.why("onednn", "torch's BLAS (MKL uses this CPU's widest vectors)")
    else:
        decisions.why("onednn", f"torch's own {compute} kernels (oneDNN is lowtune's path for fp32 products only)")
    return "cached", onednn


def _checkpointing(
    setting: bool | str, machine: Machine, on_gpu: bool, run_shape: RunShape | None, decisions: _Decisions
) -> tuple[Checkpointing, MemoryPlan | None]:
    def planned(checkpointing: Checkpointing) -> tuple[Checkpointing, MemoryPlan | None]:
        return checkpointing, run_shape.plan(checkpointing) if run_shape else None

    if setting == "offload" and not on_gpu:
        decisions.refuse(
            "train.gradient_checkpointing: offload moves layer inputs from the GPU to host memory, and this run is on "
            "the CPU (they are in host memory already)",
            "set train.gradient_checkpointing: true (or auto)",
        )
    if setting != "auto":
        decisions.why("gradient_checkpointing", "train.gradient_checkpointing")
        return planned(Checkpointing("offload" if setting == "offload" else "on" if setting else "off"))
    if not on_gpu:
        decisions.why("gradient_checkpointing", "CPU: memory is rarely the limit, and recomputing costs time")
        return planned(OFF)
    if run_shape is None:
        decisions.why("gradient_checkpointing", "no memory plan for this model family: every layer, inputs on the GPU")
        return planned(Checkpointing("on"))
    budget = GPU_BUDGET * machine.gpu.memory
    without = run_shape.plan(OFF)
    if without.total <= budget:
        decisions.why(
            "gradient_checkpointing",
            f"planned peak without it {without.total / GIB:.1f} GiB, GPU budget {budget / GIB:.1f} GiB",
        )
        return OFF, without
    # As few layers as make it fit (each one recomputed costs time); their inputs offloaded when the host has room
    # (as fast as keeping them on the GPU, 3.7 GiB less at 16k tokens on a 7B model: bench/NOTES.md).
    layer_inputs, room = run_shape.plan(Checkpointing("offload")).host, host_share(machine.host_memory_available)
    mode = "offload" if layer_inputs <= room else "on"
    total = run_shape.shape.layers
    count = next((n for n in range(1, total) if run_shape.plan(Checkpointing(mode, n)).total <= budget), total)
    chosen = run_shape.plan(Checkpointing(mode, None if count == total else count))
    decisions.why(
        "gradient_checkpointing",
        f"planned peak without it {without.total / GIB:.1f} GiB, with it {chosen.total / GIB:.1f} GiB, GPU budget "
        f"{budget / GIB:.1f} GiB; layer inputs {layer_inputs / GIB:.1f} GiB, room in host memory {room / GIB:.1f} GiB",
    )
    return chosen.checkpointing, chosen


def _down_input(
    checkpointing: Checkpointing,
    plan: MemoryPlan,
    machine: Machine,
    on_gpu: bool,
    run_shape: RunShape,
    decisions: _Decisions,
) -> tuple[bool, MemoryPlan]:
    """Whether the fused MLP makes down's input again in the backward pass (and the plan that goes with it).

    Without checkpointing it costs ~3% of a step, so it is kept where the plan fits; with checkpointing the cost
    disappears within the recomputation's (bench/NOTES.md, change 13) and the memory is what the run is short of.
    """
    if not on_gpu:
        decisions.why("down_input", "CPU: host memory is shared with everything else, and the cost is small there")
        return True, plan
    if checkpointing.mode != "off":
        decisions.why("down_input", "checkpointing: memory is short, and the cost is lost in the recomputation's")
        return True, plan
    kept = replace(run_shape, remake_down=False).plan(checkpointing)
    budget = GPU_BUDGET * machine.gpu.memory
    if kept.total <= budget:
        fits = f"planned peak with it kept {kept.total / GIB:.1f} GiB, budget {budget / GIB:.1f} GiB"
        decisions.why("down_input", fits)
        return False, kept
    decisions.why(
        "down_input",
        f"planned peak with it kept {kept.total / GIB:.1f} GiB, over the budget {budget / GIB:.1f} GiB; made again: "
        f"{plan.total / GIB:.1f} GiB",
    )
    return True, plan


def _glibc_heap(machine: Machine) -> bool:
    """Whether a CPU run's freed memory goes to glibc's malloc as it comes (which keeps blocks in its heap): the
    plan then counts what it keeps (`RunShape.glibc_heap`)."""
    return machine.libc == "glibc" and not machine.malloc_returns


def _freed_text(machine: Machine) -> str:
    """What a CPU plan takes of the host memory a step frees."""
    if _glibc_heap(machine):
        ceiling = GLIBC_MMAP_CEILING // 2**20
        return f"glibc's heap keeps {GLIBC_HEAP_KEEPS:.0%} of the activations in blocks under {ceiling} MiB (counted)"
    why = f"{', '.join(machine.malloc_returns)} set by the user" if machine.libc == "glibc" else "not glibc"
    return f"assumed returned to the OS at once ({why})"


def _device_map_text(device_map: Any) -> str:
    if device_map is None:
        return "none (FSDP places the model)"
    if isinstance(device_map, dict) and list(device_map) == [""]:
        place = device_map[""]
        return "cpu" if place == "cpu" else f"cuda:{place}"
    return str(device_map)


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_show(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "none"
    return str(value)
