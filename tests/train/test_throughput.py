"""Throughput: model FLOPs against a hand count, tokens counted from the collated rows (training batches only), steps
timed without evaluations and saves, and the figures a finished run writes."""

from __future__ import annotations

import json

import pytest
import torch

from lowtune.config import load_config
from lowtune.data.pack import PackedCollator, PaddedCollator
from lowtune.model.arch import Shape
from lowtune.model.load import load_weights
from lowtune.model.lora import attach_lora
from lowtune.recipe import prepare
from lowtune.train.throughput import Span, Throughput, ThroughputMeter, Tokens, model_flops
from lowtune.train.trainer import build_trainer
from tests.conftest import MEMORISE, tiny_config, write_jsonl

IGNORE = -100
ROWS = [  # a prompt (labels -100) and a reply, as data/encode.py writes them
    {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]},
    {"input_ids": [4, 5, 6, 7, 8], "labels": [IGNORE, IGNORE, IGNORE, 7, 8]},
]


def test_model_flops_match_a_hand_count():
    shape = Shape(hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=2, vocab=10, tied=False)
    tokens = Tokens(real=8, targets=4, pairs=21)  # records of 3 and 5 tokens: 6 + 15 pairs
    # Linear weights per layer: q 4x4, k 4x2, v 4x2, o 4x4, gate 4x8, up 4x8, down 8x4 = 144; two layers 288.
    frozen = 4 * 288  # forward and input gradient, per token
    lora = 6 * 2 * ((4 + 4) + (4 + 2)) * 2  # rank 2 on q (4 -> 4) and v (4 -> 2), two layers
    head = 4 * 10 * 4  # per labelled position
    attention = 12 * 4 * 2  # per (query, key) pair: q_width 4, two layers
    expected = (frozen + lora) * 8 + head * 4 + attention * 21
    assert model_flops(shape, tokens, lora_rank=2, lora_targets={"q_proj", "v_proj"}) == expected == 14_560


@pytest.mark.parametrize("collator", [PaddedCollator(0), PackedCollator()], ids=["padded", "packed"])
def test_tokens_are_those_the_collated_batch_trains_on(collator):
    batch = collator(ROWS)
    tokens = Tokens.of(ROWS)
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    assert batch["input_ids"].numel() == (10 if "attention_mask" in batch else 8)  # padded: two rows of 5
    assert tokens.real == real == 8
    assert tokens.targets == int((batch["labels"][:, 1:] != IGNORE).sum()) == 4  # what the loss projects
    assert tokens.pairs == 3 * 4 // 2 + 5 * 6 // 2


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def metered_trainer(tiny_qwen2, tmp_path, packing, merge):
    """The trainer `lowtune train` builds, for 4 steps of 2 micro-batches, evaluating after every step (so an
    evaluation's batches are collated behind a training batch collated ahead) and saving every 2."""
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE * 3)
    config = tiny_config(
        tiny_qwen2, data, tmp_path / "run", max_steps=4, batch_size=2, gradient_accumulation=2, save_steps=2
    )
    config.data.val_size = 2
    config.train.eval_steps = 1
    config.train.packing, config.train.merge_micro_batches = packing, merge
    setup = prepare(config)
    model = load_weights(config.model, setup.resolved.loading)
    model = attach_lora(model, config.lora, setup.resolved.lora_targets, setup.resolved.checkpointing)
    return build_trainer(config, setup.resolved, model, setup.tokenizer, setup.data.rows, setup.held_out_rows)


@pytest.mark.parametrize(("packing", "merge"), [(False, False), (True, False), (True, True)])
def test_the_meter_counts_trained_tokens_only_and_times_steps_without_evaluations_and_saves(
    tiny_qwen2, tmp_path, packing, merge
):
    trainer = metered_trainer(tiny_qwen2, tmp_path, packing, merge)
    meter = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ThroughputMeter))
    meter.clock = clock = FakeClock()
    trained, padded = [], []  # (step, real tokens) of each training forward, read from the device tensors

    def forward_takes_a_second(module, args, kwargs):
        if torch.is_inference_mode_enabled():  # the evaluation's forwards
            return
        mask = kwargs.get("attention_mask")
        real = int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()
        trained.append((trainer.state.global_step + 1, real))
        padded.append(kwargs["input_ids"].numel() - real)
        clock.now += 1.0

    trainer.model.register_forward_pre_hook(forward_takes_a_second, with_kwargs=True)
    evaluate, save = trainer.evaluate, trainer._save_checkpoint

    def slow_evaluate(*args, **kwargs):
        clock.now += 100.0
        return evaluate(*args, **kwargs)

    def slow_save(*args, **kwargs):
        clock.now += 1000.0
        return save(*args, **kwargs)

    trainer.evaluate, trainer._save_checkpoint = slow_evaluate, slow_save
    trainer.train()
    history = trainer.state.log_history
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [0, 1, 2, 3, 4]
    assert sorted(path.name for path in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # 10 records in batches of 2: steps 1 and 2 take two batches each, step 3 the epoch's last, step 4 two of the next
    steps = [step for step, _ in trained]
    assert steps == ([1, 2, 3, 4] if merge else [1, 1, 2, 2, 3, 4, 4])
    assert any(padded) != packing  # padded batches did hold padding, which the count leaves out
    first = [real for step, real in trained if step == 1]
    later = [real for step, real in trained if step > 1]
    assert meter.first_step == Span(meter.first_step.tokens, float(len(first)))  # a second per forward
    assert meter.first_step.tokens.real == sum(first)
    assert meter.timed.tokens.real == sum(later)
    assert meter.timed.seconds == len(later)  # no evaluation (100 s) nor save (1000 s) in it
    figures = meter.figures(None, 8, "all-linear")
    assert figures.tokens_per_second == sum(later) / len(later)
    assert figures.model_flops_per_token is None and figures.bf16_share is None  # no shape given


def test_the_line_and_summary_give_the_figures():
    gpu = Throughput(Span(Tokens(100), 2.5), Span(Tokens(1000), 4.0), 6.1, "cuda:0", 1e12, 1000.0, 1)
    assert gpu.describe() == (
        "trained 1,000 real tokens in 4.0 s: 250 tokens/s (after a first step of 2.5 s with warm-up), peak GPU memory "
        "6.10 GiB, 25% of this GPU's bf16 matrix rate (1,000 TFLOP/s measured)"
    )
    assert gpu.summary() | {"tokens_per_second": 250.0, "bf16_share": 0.25} == gpu.summary()
    cpu = Throughput(Span(Tokens(100), 2.5), Span(Tokens(1000), 4.0), 1.5, "cpu", 1e12, None, 1)
    assert cpu.bf16_share is None and "this run trained on the CPU" in cpu.describe()
    one_step = Throughput(Span(Tokens(100), 2.5), Span(), 1.5, "cpu", None, None, 1)
    assert one_step.tokens_per_second is None and "no rate after it" in one_step.describe()


def test_a_finished_run_writes_its_throughput(tiny_run):
    """tiny_run: 30 steps, each of the four records in one batch, checkpoints at 15 and 30."""
    throughput = json.loads((tiny_run / "run_summary.json").read_text())["throughput"]
    rows = prepare(load_config(tiny_run / "lowtune.yaml"), check_output=False).data.rows
    per_step = sum(len(row["input_ids"]) for row in rows)  # no padding
    assert throughput["first_step_tokens"] == per_step
    assert throughput["tokens"] == 29 * per_step
    assert throughput["tokens_per_second"] == pytest.approx(throughput["tokens"] / throughput["seconds"], rel=1e-3)
    assert throughput["first_step_seconds"] > 0 and throughput["seconds"] > 0
    assert throughput["memory_device"] == "cpu" and throughput["peak_memory_gib"] > 0
    assert throughput["model_flops_per_token"] > 0  # Qwen2: a known family, so its shape is known
    assert throughput["bf16_rate_tflops"] is None and throughput["bf16_share"] is None
