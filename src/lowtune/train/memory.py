"""Predict the peak GPU memory of a run before anything is loaded (`lowtune plan`).

Counted from the model's config.json and the run config, part by part:
- weights: linear layers at their quantized size (NF4: 4 bits + one 8-bit scale per 64 weights and an fp32 per 256
  scales with double quantization, else an fp32 scale per 64; LLM.int8: 8 bits + an fp32 scale per row), every other
  weight (embeddings, head, norms, biases) in `precision`;
- adapters: fp32 LoRA weights, their gradients and AdamW's two moments (16 bytes a weight);
- checkpoints: with gradient checkpointing, every checkpointed decoder layer's input (hidden x 2 bytes a token);
  offloaded to the host, only the two in flight (the layer being recomputed and the next one's, prefetched);
- activations: what autograd keeps for each layer that is not checkpointed, or for the one being recomputed, from
  the tensors each operation saves (see `_saved_bytes_per_token`), and what a layer's backward pass adds;
- loss: the hidden states and their gradient for the labelled tokens (the logits are chunked and never whole).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from lowtune.config import RunConfig
from lowtune.model.checkpointing import Checkpointing

log = logging.getLogger(__name__)

GIB = 2**30
BF16 = 2
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
LAYER_INPUTS_IN_FLIGHT = 2  # offloaded: the input of the layer in its backward pass, and the next one's, prefetched
OFF = Checkpointing("off")


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a Llama-family decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> Shape:
        heads = raw["num_attention_heads"]
        return cls(
            raw["hidden_size"],
            raw["intermediate_size"],
            raw["num_hidden_layers"],
            heads,
            raw.get("num_key_value_heads") or heads,
            raw["vocab_size"],
            bool(raw.get("tie_word_embeddings")),
        )

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder projection."""
        h, i, kv = self.hidden, self.intermediate, self.kv_width
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


@dataclass(frozen=True)
class MemoryPlan:
    weights: float
    adapters: float
    checkpoints: float
    activations: float
    loss: float
    tokens: int
    checkpointing: Checkpointing
    layers: int
    host: float = 0.0  # pinned host memory that holds the offloaded layer inputs

    @property
    def total(self) -> float:
        # The backward pass holds checkpoints and one layer's activations; the loss comes before it, on top of the
        # checkpoints only. The peak is the larger of the two phases.
        return self.weights + self.adapters + self.checkpoints + max(self.activations, self.loss)

    def table(self, title: str = "Planned peak GPU memory") -> Table:
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_row("tokens per micro-batch", f"{self.tokens:,}")
        for name in ("weights", "adapters", "checkpoints", "activations", "loss"):
            table.add_row(name, f"{getattr(self, name) / GIB:.2f} GiB")
        table.add_row("gradient checkpointing", self.checkpointing.describe(self.layers))
        if self.host:
            table.add_row("layer inputs in pinned host memory", f"{self.host / GIB:.2f} GiB")
        table.add_row("peak", f"{self.total / GIB:.2f} GiB")
        return table


def plan_memory(
    raw_config: dict[str, Any],
    quantization: str,
    precision: str,
    double_quant: bool,
    rank: int,
    targets: list[str],
    tokens: int,
    checkpointing: Checkpointing,
    dropout: float,
    fused: bool,
) -> MemoryPlan:
    shape = Shape.from_config(raw_config)
    layer_bytes = _saved_bytes_per_token(shape, dropout, fused) * tokens
    # A layer's backward pass holds the gradients of the MLP's three intermediate-wide tensors (SwiGLU output, gate,
    # up) at once, on top of what the layers keep: with it the plan is within 0.5% of the peak measured on a 7B shape
    # at 16k tokens, with and without checkpointing (bench/NOTES.md).
    backward_bytes = 3 * shape.intermediate * BF16 * tokens
    layer_input = tokens * shape.hidden * BF16
    checkpointed = checkpointing.checkpointed(shape.layers)
    on_gpu = checkpointed if checkpointing.mode == "on" else min(checkpointed, LAYER_INPUTS_IN_FLIGHT)
    # The layers kept whole are the last ones: their activations are gone before the first recomputation.
    layers_alive = max(shape.layers - checkpointed, 1 if checkpointed else 0)
    return MemoryPlan(
        weights=_weight_bytes(shape, quantization, precision, double_quant),
        adapters=16
        * rank
        * sum(i + o for name, (i, o) in shape.projections().items() if name in targets)
        * shape.layers,
        checkpoints=on_gpu * layer_input,
        activations=layers_alive * layer_bytes + backward_bytes,
        loss=2 * tokens * shape.hidden * BF16,
        tokens=tokens,
        checkpointing=checkpointing,
        layers=shape.layers,
        host=checkpointed * layer_input if checkpointing.mode == "offload" else 0.0,
    )


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a model folder, in Qwen2 terms when the folder holds a Qwen-1 checkpoint."""
    from lowtune.model import qwen1

    raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return qwen1.qwen2_config_from_qwen1(raw).to_dict() if qwen1.is_qwen1_checkpoint(folder) else raw


def _weight_bytes(shape: Shape, quantization: str, precision: str, double_quant: bool) -> float:
    linear = sum(i * o for i, o in shape.projections().values()) * shape.layers
    per_weight = {
        "none": PRECISION_BYTES[precision],
        "8bit": 1.0,
        "4bit": 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64),
    }[quantization]
    row_scales = 4 * sum(o for _, o in shape.projections().values()) * shape.layers if quantization == "8bit" else 0
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    norms_and_biases = shape.layers * (2 * shape.hidden + shape.hidden + 2 * shape.kv_width) + shape.hidden
    return linear * per_weight + row_scales + (embeddings + norms_and_biases) * PRECISION_BYTES[precision]


def _saved_bytes_per_token(shape: Shape, dropout: float, fused: bool) -> float:
    """Bytes autograd keeps for one decoder layer, per token (bf16 activations).

    Kept either way: the two norms' inputs, q/k/v after rotary and the attention output (for flash attention's
    backward), and gate/up (for SwiGLU's backward). The LoRA A products need their inputs: fused, the q/k/v group
    shares one normed input, gate/up another, o reads the attention output it already has and down the SwiGLU
    output; peft keeps those per projection, plus a clone of every output. Dropout adds a dropped copy (2 bytes) and
    a mask (1 byte) per LoRA input, once per group fused, per projection with peft; fused, the dropped copy is all the
    A product keeps (the group's input itself is not saved).
    """
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_width
    kept = BF16 * (2 * h + (h + 2 * kv) + h + 2 * i)  # norm inputs, q/k/v, attention output, gate and up
    group_inputs = {"qkv": h, "o": 0, "gate_up": h, "down": i}  # o's input is the attention output, kept above
    if fused and dropout:
        lora_inputs = 0  # the dropped copies below stand in for the group inputs
        dropout_copies = 3 * (3 * h + i)  # each group's input dropped once (o included)
    elif fused:
        lora_inputs = BF16 * sum(group_inputs.values())
        dropout_copies = 0
    else:
        lora_inputs = BF16 * (3 * h + 2 * h + i + h)  # q, k, v; gate, up; down; o (each projection its own)
        lora_inputs += BF16 * (2 * h + kv * 2 + 2 * i + h)  # peft's clone of each 4-/8-bit output
        dropout_copies = 3 * (3 * h + h + 2 * h + i) if dropout else 0
    return kept + lora_inputs + dropout_copies


def largest_batch_tokens(
    lengths: list[int], batch_size: int, tokens_per_batch: int | None, packed: bool, seed: int
) -> int:
    """Tokens in the largest micro-batch the run will see (padding included when not packed)."""
    from lowtune.data.batching import LengthBucketBatchSampler

    sampler = LengthBucketBatchSampler(lengths, batch_size, tokens_per_batch, packed, seed)
    costs = (
        sum(lengths[i] for i in batch) if packed else max(lengths[i] for i in batch) * len(batch)
        for batch in sampler.plan(0)
    )
    return max(costs)


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_planner(
    config: RunConfig, model_config: dict[str, Any], lengths: list[int], packed: bool
) -> Callable[[Checkpointing], MemoryPlan]:
    """The plan of a lowtune run (its model, quantization, LoRA, largest micro-batch and kernels) for any
    checkpointing; the largest micro-batch is found once."""
    targets = config.lora.target_modules
    targets = ALL_PROJECTIONS if isinstance(targets, str) else targets  # all-linear (a regex: counted as all)
    train = config.train
    tokens = largest_batch_tokens(lengths, train.batch_size, train.tokens_per_batch, packed, train.seed)
    fused = train.fused_lora is not False and set(ALL_PROJECTIONS) <= set(targets)

    def plan(checkpointing: Checkpointing) -> MemoryPlan:
        return plan_memory(
            model_config,
            config.model.quantization,
            config.model.precision,
            config.model.double_quant,
            config.lora.r,
            list(targets),
            tokens,
            checkpointing,
            config.lora.dropout,
            fused,
        )

    return plan


def plan_run(config: RunConfig, model_config: dict[str, Any], lengths: list[int], packed: bool) -> MemoryPlan:
    """The run's plan, with the gradient checkpointing it will use (`plan.checkpointing`): train.gradient_checkpointing
    (true, false, offload: every decoder layer); auto: off when the run fits in 90% of the GPU without it, else as few
    layers as make it fit (each one recomputed costs time), their inputs offloaded when the host has room for them
    (as fast as keeping them on the GPU, 3.7 GiB less at 16k tokens on a 7B model: bench/NOTES.md)."""
    import torch

    plan = run_planner(config, model_config, lengths, packed)
    setting = config.train.gradient_checkpointing
    if setting == "offload" and not torch.cuda.is_available():
        log.info("gradient checkpointing offload on the CPU: the layer inputs are copied within host memory (no gain)")
    if setting != "auto":
        return plan(Checkpointing("offload" if setting == "offload" else "on" if setting else "off"))
    if not torch.cuda.is_available():
        log.info("gradient checkpointing auto: off (CPU: memory is rarely the limit, recomputation costs time)")
        return plan(OFF)

    without = plan(OFF)
    budget = 0.9 * torch.cuda.mem_get_info()[1]
    if without.total <= budget:
        log.info(
            "gradient checkpointing auto: off (planned peak without it %.1f GiB, GPU budget %.1f GiB)",
            without.total / GIB,
            budget / GIB,
        )
        return without
    layer_inputs, room = plan(Checkpointing("offload")).host, host_room()
    mode = "offload" if layer_inputs <= room else "on"
    total = Shape.from_config(model_config).layers
    fitting = (count for count in range(1, total) if plan(Checkpointing(mode, count)).total <= budget)
    count = next(fitting, total)
    chosen = plan(Checkpointing(mode, None if count == total else count))
    log.info(
        "gradient checkpointing auto: %s (planned peak without it %.1f GiB, with it %.1f GiB, GPU budget %.1f GiB; "
        "layer inputs %.1f GiB, room in host memory %.1f GiB)",
        chosen.checkpointing.describe(total),
        without.total / GIB,
        chosen.total / GIB,
        budget / GIB,
        layer_inputs / GIB,
        room / GIB,
    )
    return chosen


def host_room() -> float:
    """Half the host memory available now, shared among this host's training processes (torchrun's count)."""
    import psutil

    return 0.5 * psutil.virtual_memory().available / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on the CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def device_name() -> str:
    """The GPU this process trains on, or the CPU's name."""
    import platform

    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
