"""CUDA graphs replay the eager pass: the same loss (and a preference pass's figures) and LoRA gradients,
accumulated across micro-batches and steps.

A GPU test: collected only with LOWTUNE_TEST_DEVICE=cuda (tests/conftest.py), on the GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowtune import machine
from lowtune.config import RunConfig
from lowtune.data.pack import PackedCollator
from lowtune.model.arch import PROJECTIONS, read_model_config
from lowtune.model.attention import set_attention
from lowtune.model.lora import attach_lora
from lowtune.train.graphs import BUCKET, GraphedPasses
from lowtune.train.kernels import apply_kernels
from lowtune.train.loss import install_hidden_state_loss
from lowtune.train.preference import PreferenceCollator, pair_outputs
from lowtune.train.resolve import Objective, resolve_run

LENGTHS = [37, 90, 12, 64, 200, 5, 71]


def graphed_models(folder, checkpointing: bool | str, count: int = 1, method: str = "sft"):
    """`count` copies of a tiny Qwen2 with the same LoRA weights, set up as a graphed run resolves it."""
    config = RunConfig.model_validate(
        {
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": list(PROJECTIONS)},
            "train": {"cuda_graphs": True, "gradient_checkpointing": checkpointing, "batch_size": 2, "method": method},
        }
    )
    resolved = resolve_run(config, machine.this_machine(), read_model_config(folder), LENGTHS, "qwen")
    assert resolved.cuda_graphs and resolved.loss == "masked"
    # All built before liger's kernels are applied: liger also swaps the modeling module's classes for models
    # built later, which would make the copies differ.
    bases = [
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": "cuda"})
        for _ in range(count)
    ]
    models = []
    for base in bases:
        torch.manual_seed(0)
        model = attach_lora(base, config.lora, resolved.lora_targets, resolved.checkpointing)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_()
        set_attention(model.get_base_model(), resolved.attention)
        install_hidden_state_loss(model.get_base_model(), resolved.loss)
        apply_kernels(model, resolved)
        model.train()
        models.append(model)
    return models


def random_rows(lengths):
    generator = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(0, 1000, (n,), generator=generator).tolist()} for n in lengths]
    for row in rows:
        row["labels"] = [-100] * (len(row["input_ids"]) // 2) + row["input_ids"][len(row["input_ids"]) // 2 :]
        row["attention_mask"] = [1] * len(row["input_ids"])
    return rows


def micro_batches(splits):
    """Packed, bucketed micro-batches of random records, `num_items_in_batch` counting the whole step's targets."""
    rows = random_rows(LENGTHS)
    batches = [PackedCollator(BUCKET)(rows[start:stop]) for start, stop in splits]
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    return on_the_gpu(batches, targets)


def on_the_gpu(batches, items):
    for batch in batches:
        batch.pop("real_tokens")
        batch |= {k: v.cuda() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        batch["num_items_in_batch"] = torch.tensor(items, device="cuda")
    return batches


def model_loss(model):
    return lambda batch: {"loss": model(**batch).loss}


def autocast():
    return torch.autocast("cuda", torch.bfloat16)


def eager_step(model, params, batches):
    """The micro-batches' losses and summed gradients, eager (on a model of its own: a capture fails on adapters
    whose gradient nodes an eager pass bound to the default stream; Trainer runs no eager pass before the graphs)."""
    losses, total = [], None
    for batch in batches:
        with autocast():
            loss = model(**batch).loss
        grads = torch.autograd.grad(loss, params)
        total = list(grads) if total is None else [t + g for t, g in zip(total, grads, strict=True)]
        losses.append(loss.detach())
    return losses, total


@pytest.mark.parametrize("checkpointing", [False, True, "offload"])
def test_graphs_accumulate_the_eager_loss_and_gradients(tiny_qwen2, qwen2_modeling_restored, checkpointing):
    batches = micro_batches([(0, 2), (2, 5), (5, 7)])
    shapes = len({b["input_ids"].shape[1] for b in batches})
    assert shapes == 2  # 128, 384 and 128 tokens: the third replays the first one's graph
    reference, model = graphed_models(tiny_qwen2, checkpointing, 2)  # the eager pass runs on a model of its own
    eager_losses, eager_grads = eager_step(reference, [p for p in reference.parameters() if p.requires_grad], batches)
    params = [p for p in model.parameters() if p.requires_grad]
    passes = GraphedPasses(model_loss(model), params, autocast)
    for _ in range(2):  # the second step replays, after the optimizer would have set the gradients to None
        for param in params:
            param.grad = None
        losses = [passes(batch)["loss"] for batch in batches]
        assert passes.captured == shapes
        for graphed, eager in zip(losses, eager_losses, strict=True):
            torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-5)
        for param, grad, buffer in zip(params, eager_grads, passes.gradients, strict=True):
            assert param.grad is buffer and grad.abs().sum() > 0
            torch.testing.assert_close(param.grad, grad, rtol=1e-3, atol=1e-5)


def test_gradients_written_outside_the_graphs_stop_the_run(tiny_qwen2, qwen2_modeling_restored):
    (model,) = graphed_models(tiny_qwen2, checkpointing=False)
    params = [p for p in model.parameters() if p.requires_grad]
    (batch,) = micro_batches([(0, 3)])
    passes = GraphedPasses(model_loss(model), params, autocast)
    passes(batch)
    params[0].grad = torch.zeros_like(params[0])
    with pytest.raises(RuntimeError, match="outside the CUDA graphs"):
        passes(batch)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_graphed_preference_passes_give_the_eager_figures_and_gradients(tiny_qwen2, qwen2_modeling_restored, method):
    """Pairs (chosen, rejected) packed with their owners and reference log-probabilities: the graph's loss, its
    figures for the log (margin, accuracy, pairs) and its gradients equal the eager pass's, replay after replay."""
    objective = Objective(method, 0.1)
    rows = random_rows([37, 41, 90, 12, 64, 70, 20, 5])  # four pairs
    for row, reference in zip(rows, torch.linspace(-80, -20, len(rows)).tolist(), strict=True):
        row["reference_logp"] = reference
    collate = PreferenceCollator(PackedCollator(BUCKET), packed=True)
    batches = on_the_gpu([collate(rows[:4]), collate(rows[4:])], items=4)
    reference_model, model = graphed_models(tiny_qwen2, "offload", 2, method)
    params = [p for p in reference_model.parameters() if p.requires_grad]
    eager, eager_grads = [], None
    for batch in batches:
        with autocast():
            outputs = pair_outputs(reference_model, batch, objective)
        grads = torch.autograd.grad(outputs["loss"], params)
        eager_grads = list(grads) if eager_grads is None else [t + g for t, g in zip(eager_grads, grads, strict=True)]
        eager.append({name: value.detach() for name, value in outputs.items()})
    params = [p for p in model.parameters() if p.requires_grad]
    passes = GraphedPasses(lambda batch: pair_outputs(model, batch, objective), params, autocast)
    for _ in range(2):
        for param in params:
            param.grad = None
        graphed = [passes(batch) for batch in batches]
        assert passes.captured == 1  # both batches: 2 pairs, 256 tokens
        for got, expected in zip(graphed, eager, strict=True):
            assert got.keys() == expected.keys() and got["pairs"] == 2
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5)
        for param, grad in zip(params, eager_grads, strict=True):
            assert grad.abs().sum() > 0
            torch.testing.assert_close(param.grad, grad, rtol=1e-3, atol=1e-5)
