"""The memory plan's arithmetic: what offloading saves, what checkpointing some layers keeps, what a dense copy adds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Qwen2Config

from lowtune.bench.model import QWEN_7B_SHAPE
from lowtune.model.arch import PROJECTIONS, llama
from lowtune.model.checkpointing import Checkpointing
from lowtune.train.memory import GLIBC_HEAP_KEEPS, RunShape, linear_weights

SHAPE = llama.FAMILY.shape(Qwen2Config(**QWEN_7B_SHAPE).to_dict())
LAYER_INPUT = 16384 * 4096 * 2  # one decoder layer's input at 16k tokens, bf16


def run_shape(**changes) -> RunShape:
    fields = dict(
        shape=SHAPE,
        quantization="4bit",
        precision="bf16",
        double_quant=True,
        rank=8,
        targets=frozenset(PROJECTIONS),
        tokens=16384,
        dropout=0.1,
        fused=True,
    )
    return RunShape(**(fields | changes))


def plan(mode, layers=None):
    return run_shape().plan(Checkpointing(mode, layers))


def test_offload_keeps_two_layer_inputs_on_the_gpu_and_the_rest_on_the_host():
    on, offload, off = plan("on"), plan("offload"), plan("off")
    assert on.checkpoints == 32 * LAYER_INPUT and on.host == 0
    assert offload.checkpoints == 2 * LAYER_INPUT and offload.host == 32 * LAYER_INPUT
    assert on.total - offload.total == 30 * LAYER_INPUT  # 3.75 GiB at 16k tokens
    assert offload.activations == on.activations < off.activations
    rows = list(offload.table().columns[0].cells)
    assert "layer inputs in pinned host memory" in rows
    assert "on, all 32 of 32 layers, inputs on the host" in list(offload.table().columns[1].cells)


def test_checkpointing_some_layers_keeps_the_others_whole():
    layer = plan("off").activations - plan("on").activations  # 31 layers' activations
    layer /= 31
    for count in (1, 8, 31):
        some = plan("on", count)
        assert some.checkpoints == count * LAYER_INPUT
        # The last 32 - count layers keep their activations; the checkpointed ones are recomputed after those are freed.
        assert some.activations == pytest.approx(plan("on").activations + (31 - count) * layer)
    assert plan("on", 32).total == plan("on").total
    totals = [plan("offload", count).total for count in range(1, 33)]
    assert totals == sorted(totals, reverse=True)  # each layer checkpointed lowers the peak
    assert plan("offload", 8).host == 8 * LAYER_INPUT


def test_a_dense_copy_of_the_base_adds_every_linear_weight_in_the_compute_dtype():
    dense = linear_weights(SHAPE) * 4
    assert run_shape(dense_copy_bytes=dense).plan(Checkpointing("off")).weights - plan("off").weights == dense
    assert linear_weights(SHAPE) == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)


def test_qwen3_head_norms_and_wide_queries_are_counted():
    """Qwen3-style: head_dim 128 with 16 heads on hidden 1024 makes the query 2048 wide; its head norms keep q and k."""
    raw = dict(
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
    )
    from lowtune.model.arch import qwen3

    shape = qwen3.FAMILY.shape(raw)
    assert shape.projections()["q_proj"] == (1024, 2048) and shape.projections()["o_proj"] == (2048, 1024)
    with_norms = run_shape(shape=shape).plan(Checkpointing("off")).activations
    without = run_shape(shape=llama.FAMILY.shape(raw)).plan(Checkpointing("off")).activations
    assert with_norms - without == 28 * 16384 * 2 * (2048 + 1024)  # every layer keeps q and k before their norms


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_keeping_down_input_costs_two_bytes_per_intermediate_feature_a_token_and_layer(dropout):
    made_again = run_shape(dropout=dropout).plan(Checkpointing("off"))
    kept = run_shape(dropout=dropout, remake_down=False).plan(Checkpointing("off"))
    # bf16 input without dropout; with it, its dropped copy and mask (3 bytes) instead of the mask alone (1 byte)
    assert kept.activations - made_again.activations == 2 * SHAPE.intermediate * 16384 * SHAPE.layers


def test_eager_attention_on_a_bf16_cpu_keeps_the_fp32_softmax_output_beside_its_bf16_cast():
    """transformers' eager attention: softmax(dtype=float32) keeps its fp32 output for its backward, .to(bf16) the
    cast for the product with the values; in fp32 they are one tensor (4 bytes a probability, 6 in bf16)."""
    cpu = dict(device="cpu", attention="eager", row_length=512, tokens=4096, dropout=0.0)
    per_probability = {}
    for precision in ("fp32", "bf16"):
        eager, sdpa = (run_shape(precision=precision, **cpu | {"attention": a}) for a in ("eager", "sdpa"))
        kept = eager.plan(Checkpointing("off")).activations - sdpa.plan(Checkpointing("off")).activations
        repeated = 2 * (SHAPE.q_width - SHAPE.kv_width) * 4096 * {"fp32": 4, "bf16": 2}[precision] * SHAPE.layers
        backward = 2 * SHAPE.heads * 512 * 4 * 4096  # the probabilities' and the scores' gradients, in fp32
        per_probability[precision] = (kept - repeated - backward) / (SHAPE.heads * 512 * 4096 * SHAPE.layers)
    assert per_probability == {"fp32": 4, "bf16": 6}


def test_glibcs_heap_keeps_a_share_of_the_activations_in_blocks_under_32_mib():
    """256 tokens of rows of 2,048: an intermediate-wide activation is 19.4 MB, in the heap; eager attention's
    probabilities are one 58.7 MB block a layer, mmapped and returned when freed: not counted. At 4,096 tokens even
    an intermediate-wide activation is above 32 MiB, and nothing is."""
    cpu = dict(device="cpu", attention="eager", row_length=2048, tokens=256, dropout=0.0, precision="fp32")
    kept, returned = (run_shape(**cpu, glibc_heap=heap).plan(Checkpointing("off")) for heap in (True, False))
    eager, sdpa = (run_shape(**cpu | {"attention": a}).plan(Checkpointing("off")) for a in ("eager", "sdpa"))
    probabilities = SHAPE.heads * 2048 * 4 * 256 * SHAPE.layers
    backward = 2 * SHAPE.heads * 2048 * 4 * 256 + 3 * SHAPE.intermediate * 4 * 256  # the backward pass's own
    heap_activations = eager.activations - probabilities - backward
    assert kept.retained == pytest.approx(GLIBC_HEAP_KEEPS * heap_activations)
    assert kept.total - returned.total == pytest.approx(kept.retained) and returned.retained == 0
    assert run_shape(**cpu | {"tokens": 4096}, glibc_heap=True).plan(Checkpointing("off")).retained == 0


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_the_cpu_plan_holds_the_default_examples_peak_resident_memory(tmp_path, precision):
    """One step of the default example on this CPU, its largest micro-batch (8 x 512 tokens) first, run by
    bench/cpu_memory.py with glibc's malloc as it comes (no MALLOC_* variable): the host-memory plan, which counts
    what glibc's heap keeps of the freed activations, within 15% of the process's peak resident memory.

    In fp32 (the default example's precision on CPUs without native bf16: 9.52 GiB planned on every machine), and as
    this CPU resolves it (bf16 where it is native: 7.33 GiB planned, 7.72-7.84 measured; bench/NOTES.md)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(REPO / "src")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cpu_memory.py"), "--steps", "1", f"model.precision={precision}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["plan"]["device"] == "cpu" and record["largest_tokens"] == 4096
    assert record["plan"]["freed"].startswith("glibc's heap keeps")
    assert record["planned_gib"] == pytest.approx(record["peak_rss_gib"], rel=0.15), record


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_adds_its_magnitudes_what_its_forward_keeps_and_the_weight_norm(dropout):
    """Per adapted layer: a magnitude per output row (16 bytes with its gradient and moments), B A x kept (and,
    with dropout, the base output again and the dequantized weight), and the largest layer's norm of W + s B A."""
    plain, dora = (run_shape(fused=False, dropout=dropout, dora=d).plan(Checkpointing("off")) for d in (False, True))
    projections = SHAPE.projections().values()
    outputs = sum(o for _, o in projections)
    assert dora.adapters - plain.adapters == 16 * outputs * SHAPE.layers
    kept = 2 * outputs * (2 if dropout else 1) * 16384 + (2 * sum(i * o for i, o in projections) if dropout else 0)
    transient = max(4 * i * i + 14 * i * o for i, o in projections)
    assert dora.activations - plain.activations == SHAPE.layers * kept + transient
    assert dora.weights == plain.weights and dora.loss == plain.loss
