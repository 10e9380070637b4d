"""Predict the peak GPU memory of a run before anything is loaded (`lowtune plan`), or on the CPU its peak host
memory (resident set).

Counted from the model family's shape (`model/arch`) and the run's choices, part by part:
- weights: linear layers at their quantized size (NF4: 4 bits + one 8-bit scale per 64 weights and an fp32 per 256
  scales with double quantization, else an fp32 scale per 64; LLM.int8: 8 bits + an fp32 scale per row), every other
  weight (embeddings, head, norms, biases) in `precision`; and, where the base products are cached, a dense copy of
  every linear weight in the compute dtype;
- adapters: fp32 LoRA weights, their gradients and AdamW's two moments (16 bytes a weight); with DoRA its
  magnitude vectors too, and what its forward keeps and computes (`dora_bytes`);
- checkpoints: with gradient checkpointing, every checkpointed decoder layer's input (hidden x 2 bytes a token);
  offloaded to the host, only the two in flight (the layer being recomputed and the next one's, prefetched);
- activations: what autograd keeps for each layer that is not checkpointed, or for the one being recomputed, from
  the tensors each operation saves (see `saved_bytes_per_token`), and what a layer's backward pass adds;
- loss: the hidden states and their gradient for the labelled tokens (the logits are chunked and never whole), and
  the chunk of logits that lowtune's chunked losses hold.

On the CPU the same parts are counted as the CPU holds them, in host memory: activations in the compute dtype (fp32
where the CPU has no native bf16), SwiGLU's output kept beside gate and up (no liger-kernel), eager attention's
probabilities (records x heads x length^2 per layer; in bf16 its fp32 softmax output too) and its keys and values
repeated to every head, and the process itself (`HOST_BASELINE`: Python, torch, transformers, the tokenizer and the
records).

What is live is not all a CPU run holds: glibc's malloc, as it comes, raises its mmap threshold to 32 MiB as mmapped
blocks are freed, and from then on keeps what is freed in blocks under it (the fp32 activations of 9-25 MB here) in
its heap, fragmented, for reuse. The CPU plan counts that as `retained`: `GLIBC_HEAP_KEEPS` of the activations a
layer keeps in such blocks (`RunShape.heap_bytes_per_token`), measured, not derived. Returning those blocks at once
instead (a fixed threshold under them, MALLOC_MMAP_THRESHOLD_ or mallopt) costs 10-20% of a step in fp32 and 30-45%
in bf16 here, so lowtune leaves glibc as it is. Measured on the default example in fp32 (bench/cpu_memory.py, its
largest batch of 8 x 512 tokens first; bench/NOTES.md, issue 20): 9.38-9.90 GiB, the whole job 8.49 GiB; planned
9.52 GiB (7.83 live, 1.69 kept). Where the user set glibc's mmap or trim threshold (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or their GLIBC_TUNABLES) or the C library is another, the plan assumes freed memory returned
at once, and says so (`freed`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from lowtune.model.arch import Shape
from lowtune.model.checkpointing import Checkpointing
from lowtune.train.loss import chunk_peak_bytes

GIB = 2**30
BF16 = 2
FP32 = 4
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
LAYER_INPUTS_IN_FLIGHT = 2  # offloaded: the input of the layer in its backward pass, and the next one's, prefetched
# A CPU run's process before any weight: Python, torch 2.13 (CPU), transformers 5.25, the tokenizer and the bundled
# records; measured resident 0.70 GiB (bench/cpu_memory.py, "records and tokenizer").
HOST_BASELINE = int(0.70 * GIB)
# glibc's malloc as it comes raises its mmap threshold up to 32 MiB as mmapped blocks are freed: from then on blocks
# under it come from its heap, and the heap keeps what is freed there, fragmented, for reuse. Measured with the
# default example's largest batch first (bench/NOTES.md, issue 20), the peak is above what is live by about this
# share of the activations kept in such blocks (0.44 in fp32, 0.61 in bf16 at the median peaks; 0.40 keeps the
# whole job, whose peak is lower, within 15% too).
GLIBC_MMAP_CEILING = 32 * 2**20
GLIBC_HEAP_KEEPS = 0.40


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
    device: str = "cuda"  # "cpu": the plan is of host memory, the process included
    process: float = 0.0  # the process itself before any weight (CPU plans)
    freed: str = ""  # what a CPU plan takes of the memory a step frees (train/resolve.py)
    retained: float = 0.0  # what glibc's heap keeps of the freed activations (CPU plans, `GLIBC_HEAP_KEEPS`)

    @property
    def total(self) -> float:
        # The backward pass holds checkpoints and one layer's activations; the loss comes before it, on top of the
        # checkpoints only. The peak is the larger of the two phases.
        # What glibc's heap keeps builds up with the backward pass's frees, on top of its activations.
        held = max(self.activations + self.retained, self.loss)
        return self.process + self.weights + self.adapters + self.checkpoints + held

    @property
    def memory(self) -> str:
        """What the plan is of."""
        return "host memory (CPU)" if self.device == "cpu" else "GPU memory"

    def table(self, title: str | None = None) -> Table:
        table = Table(title=title or f"Planned peak {self.memory}", show_header=False, title_justify="left")
        table.add_row("device", "CPU (host memory)" if self.device == "cpu" else "GPU")
        table.add_row("tokens per micro-batch", f"{self.tokens:,}")
        if self.device == "cpu":
            table.add_row("process (Python, torch, tokenizer, records)", f"{self.process / GIB:.2f} GiB")
        for name in ("weights", "adapters", "checkpoints", "activations", "loss"):
            table.add_row(name, f"{getattr(self, name) / GIB:.2f} GiB")
        table.add_row("gradient checkpointing", self.checkpointing.describe(self.layers))
        if self.host:
            table.add_row("layer inputs in pinned host memory", f"{self.host / GIB:.2f} GiB")
        if self.freed:
            table.add_row("kept by glibc's heap", f"{self.retained / GIB:.2f} GiB")
            table.add_row("freed memory", self.freed)
        table.add_row("peak", f"{self.total / GIB:.2f} GiB")
        return table

    def summary(self) -> dict[str, float | int | str]:
        """The plan in GiB, for resolved.yaml."""
        parts = {name: round(getattr(self, name) / GIB, 3) for name in ("weights", "adapters", "checkpoints")}
        parts |= {"activations": round(self.activations / GIB, 3), "loss": round(self.loss / GIB, 3)}
        parts |= {"host": round(self.host / GIB, 3), "peak": round(self.total / GIB, 3), "tokens": self.tokens}
        cpu = {"device": "cpu", "process": round(self.process / GIB, 3), "retained": round(self.retained / GIB, 3)}
        cpu["freed"] = self.freed
        return parts | (cpu if self.device == "cpu" else {})


@dataclass(frozen=True)
class RunShape:
    """What a run's memory depends on beyond the checkpointing: the model, its precision, LoRA and kernels."""

    shape: Shape
    quantization: str
    precision: str
    double_quant: bool
    rank: int
    targets: frozenset[str]  # which of the seven projections carry adapters
    tokens: int  # in the largest micro-batch
    dropout: float
    fused: bool
    dora: bool = False  # lora.variant dora (peft's modules; see `dora_bytes`)
    loss: str = "liger"  # the loss kernel (train/loss.py): the chunked ones hold a chunk of logits
    dense_copy_bytes: int = 0  # the cached dense base weights (GroupKernels.dequantize_once)
    remake_down: bool = True  # the fused MLP makes down's input again in the backward pass (GroupKernels)
    device: str = "cuda"  # "cpu": host memory, as the CPU holds the run (see the module docstring)
    glibc_heap: bool = False  # a CPU run's freed memory goes to glibc's malloc as it comes (`GLIBC_HEAP_KEEPS`)
    row_length: int = 0  # the longest row of the largest micro-batch (eager attention's probabilities grow with it)
    attention: str = "sdpa"

    def plan(self, checkpointing: Checkpointing) -> MemoryPlan:
        shape, tokens = self.shape, self.tokens
        on_cpu = self.device == "cpu"
        # Activations in the compute dtype: bf16 on the GPU (autocast), the CPU's own (fp32 without native bf16).
        width = PRECISION_BYTES[self.precision] if on_cpu else BF16
        per_token = saved_bytes_per_token(shape, self.dropout, self.fused, self.remake_down) * width / BF16
        if on_cpu:
            per_token += width * shape.intermediate  # SwiGLU's output, kept by its own backward (no liger-kernel)
            per_token += eager_bytes_per_token(shape, self.row_length, width) if self.attention == "eager" else 0
        layer_bytes = per_token * tokens
        # A layer's backward pass holds the gradients of the MLP's three intermediate-wide tensors (SwiGLU output,
        # gate, up) at once, on top of what the layers keep: with it the plan is within 0.5% of the peak measured on
        # a 7B shape at 16k tokens, with and without checkpointing (bench/NOTES.md).
        backward_bytes = 3 * shape.intermediate * width * tokens
        if on_cpu and self.attention == "eager":  # the probabilities' gradient and the scores' it makes, in fp32
            backward_bytes += 2 * shape.heads * self.row_length * FP32 * tokens
        layer_input = tokens * shape.hidden * BF16
        checkpointed = checkpointing.checkpointed(shape.layers)
        on_gpu = checkpointed if checkpointing.mode == "on" else min(checkpointed, LAYER_INPUTS_IN_FLIGHT)
        # The layers kept whole are the last ones: their activations are gone before the first recomputation.
        layers_alive = max(shape.layers - checkpointed, 1 if checkpointed else 0)
        adapted = sum(i + o for name, (i, o) in shape.projections().items() if name in self.targets)
        dora = DoraBytes(0, 0, 0, 0)
        if self.dora:
            dora = dora_bytes(shape, self.targets, self.dropout, PRECISION_BYTES[self.precision] if on_cpu else BF16)
        return MemoryPlan(
            weights=weight_bytes(shape, self.quantization, self.precision, self.double_quant) + self.dense_copy_bytes,
            adapters=16 * self.rank * adapted * shape.layers + dora.magnitudes,
            checkpoints=on_gpu * layer_input,
            activations=layers_alive * (layer_bytes + dora.per_token * tokens + dora.per_layer)
            + backward_bytes
            + dora.transient,
            loss=2 * tokens * shape.hidden * BF16 + chunk_peak_bytes(tokens, shape.vocab, self.loss),
            tokens=tokens,
            checkpointing=checkpointing,
            layers=shape.layers,
            host=checkpointed * layer_input if checkpointing.mode == "offload" else 0.0,
            device="cpu" if on_cpu else "cuda",
            process=HOST_BASELINE if on_cpu else 0.0,
            retained=GLIBC_HEAP_KEEPS * layers_alive * self.heap_bytes_per_token(per_token, width) * tokens
            if on_cpu and self.glibc_heap
            else 0.0,
        )

    def heap_bytes_per_token(self, per_token: float, width: int) -> float:
        """Of what a layer keeps per token, the bytes in blocks glibc's heap holds (under `GLIBC_MMAP_CEILING`):
        none where even an intermediate-wide activation is above it (the layer's blocks are then mmapped, returned
        when freed), and not eager attention's probabilities where each layer's is above it."""
        shape, tokens = self.shape, self.tokens
        if tokens * shape.intermediate * width >= GLIBC_MMAP_CEILING:
            return 0.0
        if self.attention != "eager":
            return per_token
        probabilities = (FP32, width) if width != FP32 else (FP32,)  # the fp32 softmax output and its cast
        per_probability = shape.heads * self.row_length
        mmapped = sum(b for b in probabilities if tokens * per_probability * b >= GLIBC_MMAP_CEILING)
        return per_token - per_probability * mmapped


@dataclass(frozen=True)
class DoraBytes:
    magnitudes: int  # the magnitude vectors (one fp32 weight per output row), their gradients and AdamW's moments
    per_token: float  # kept per token and layer
    per_layer: float  # kept per layer whatever the tokens
    transient: float  # while one layer computes its weight norm


def dora_bytes(shape: Shape, targets: frozenset[str], dropout: float, width: int) -> DoraBytes:
    """What peft's DoRA (`peft/tuners/lora/dora.py`) adds to plain LoRA, with activations `width` bytes wide.

    - Each adapted layer trains a magnitude vector, one fp32 weight per output row: 16 bytes each with its gradient
      and AdamW's two moments.
    - Its output (m / ||W + s B A||) (W x) + (m / ||W + s B A||) s B A x keeps the LoRA product B A x for the
      magnitude's gradient (the base output it also needs is peft's clone, counted already); with dropout, the base
      output is computed again from the dropped input, which keeps that output and the dequantized weight itself.
    - Every forward pass computes the row norms of W + s B A: an identity (in x in, fp32) through the adapter gives
      B A (out x in, fp32), the weight is dequantized (`width`), s B A and the sum are made in fp32; the largest
      adapted layer sets that transient.
    """
    adapted = {name: size for name, size in shape.projections().items() if name in targets}
    outputs = sum(o for _, o in adapted.values())
    per_token = width * outputs * (2 if dropout else 1)
    per_layer = width * sum(i * o for i, o in adapted.values()) if dropout else 0
    transient = max((4 * i * i + (12 + width) * i * o for i, o in adapted.values()), default=0)
    return DoraBytes(16 * outputs * shape.layers, per_token, per_layer, transient)


def linear_weights(shape: Shape) -> int:
    """Weights in the decoder's linear layers."""
    return sum(i * o for i, o in shape.projections().values()) * shape.layers


def weight_bytes(shape: Shape, quantization: str, precision: str, double_quant: bool) -> float:
    per_weight = {
        "none": PRECISION_BYTES[precision],
        "8bit": 1.0,
        "4bit": 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64),
    }[quantization]
    row_scales = 4 * sum(o for _, o in shape.projections().values()) * shape.layers if quantization == "8bit" else 0
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    norms_and_biases = shape.layers * (2 * shape.hidden + shape.q_width + 2 * shape.kv_width) + shape.hidden
    return (
        linear_weights(shape) * per_weight + row_scales + (embeddings + norms_and_biases) * PRECISION_BYTES[precision]
    )


def saved_bytes_per_token(shape: Shape, dropout: float, fused: bool, remake_down: bool = True) -> float:
    """Bytes autograd keeps for one decoder layer, per token (bf16 activations).

    Kept either way: the two norms' inputs, q/k/v after rotary and the attention output (for flash attention's
    backward), gate/up (for SwiGLU's backward), and with Qwen3's head norms the query and key before them. The LoRA
    A products need their inputs: fused, the q/k/v group shares one normed input, gate/up another, o reads the
    attention output it already has, and down keeps the SwiGLU output or, with `remake_down`, makes it again from
    gate and up; peft keeps those per projection, plus a clone of every output. Dropout adds a dropped copy (2
    bytes) and a mask (1 byte) per LoRA input, once per group fused, per projection with peft; fused, the dropped
    copy is all the A product keeps (the group's input itself is not saved), and a remade down keeps only the mask.
    """
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_width, shape.kv_width
    kept = BF16 * (2 * h + (q + 2 * kv) + q + 2 * i)  # norm inputs, q/k/v, attention output, gate and up
    if shape.qk_norm:
        kept += BF16 * (q + kv)  # the head norms' inputs
    down = 0 if remake_down else i
    group_inputs = {"qkv": h, "o": 0, "gate_up": h, "down": down}  # o's input is the attention output, kept above
    if fused and dropout:
        lora_inputs = 0  # the dropped copies below stand in for the group inputs
        dropout_copies = 3 * (2 * h + q + down) + (i if remake_down else 0)  # each group's input dropped once
    elif fused:
        lora_inputs = BF16 * sum(group_inputs.values())
        dropout_copies = 0
    else:
        lora_inputs = BF16 * (3 * h + 2 * h + i + q)  # q, k, v; gate, up; down; o (each projection its own)
        lora_inputs += BF16 * (q + 2 * kv + h + 2 * i + h)  # peft's clone of each 4-/8-bit output
        dropout_copies = 3 * (3 * h + q + 2 * h + i) if dropout else 0
    return kept + lora_inputs + dropout_copies


def eager_bytes_per_token(shape: Shape, row_length: int, width: int) -> float:
    """What eager attention keeps per token and layer beyond flash attention's q, k, v: the softmax's output (one
    probability per head and key of the row) and the keys and values repeated to every query head.

    transformers' eager attention computes the softmax in fp32, which keeps its fp32 output for its backward, and
    casts it to the compute dtype for the product with the values, which keeps that cast: in bf16 both are kept (6
    bytes a probability; on the default example 2.26 GiB the plan lacked, bench/NOTES.md), in fp32 they are one."""
    probabilities = shape.heads * row_length * (FP32 + (width if width != FP32 else 0))
    repeated = 2 * (shape.q_width - shape.kv_width) * width
    return probabilities + repeated


def largest_batch_tokens(
    lengths: list[int], batch_size: int, tokens_per_batch: int | None, packed: bool, seed: int, merge: int = 1
) -> int:
    """Tokens in the largest micro-batch the run will see (padding included when not packed); `merge` as the
    batch sampler takes it."""
    from lowtune.data.batching import LengthBucketBatchSampler

    sampler = LengthBucketBatchSampler(lengths, batch_size, tokens_per_batch, packed, seed, merge=merge)
    costs = (
        sum(lengths[i] for i in batch) if packed else max(lengths[i] for i in batch) * len(batch)
        for batch in sampler.plan(0)
    )
    return max(costs)


def peak_memory_gib(device: Any = None) -> float:
    """Peak memory allocated on a CUDA `device` (None: the current GPU if there is one), or this process's peak
    resident memory for the CPU."""
    import resource

    import torch

    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_gpu:
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def host_share(available: int) -> float:
    """Half the host memory available, shared among this host's training processes (torchrun's count)."""
    return 0.5 * available / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
