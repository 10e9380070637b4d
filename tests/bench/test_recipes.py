"""The benchmark's machinery on the CPU: both recipes train a tiny model and measure what the GPU run reports."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowtune.bench.peer_unsloth import concatenated_rows
from lowtune.bench.recipes import SEVEN_PROJECTIONS, lowtune_recipe, tutorial_recipe
from lowtune.bench.run import Regime, _recipe_options, _result_line, lowtune_name, results_table
from lowtune.data.encode import encode_records
from lowtune.errors import UserError
from tests.conftest import MEMORISE


@pytest.fixture(scope="module")
def rows(qwen_tokenizer):
    return encode_records(MEMORISE * 20, qwen_tokenizer, template="seed", max_length=384)


def fresh_model(folder):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_both_recipes_measure_and_agree_on_the_same_samples(tiny_qwen2, qwen_tokenizer, rows):
    tutorial = tutorial_recipe(fresh_model(tiny_qwen2), qwen_tokenizer, rows, "none", steps=4, warmup=1)
    ours = lowtune_recipe(
        fresh_model(tiny_qwen2), qwen_tokenizer, rows, "none", steps=4, warmup=1, tokens_per_batch=2048
    )
    checkpointed = lowtune_recipe(
        fresh_model(tiny_qwen2), qwen_tokenizer, rows, "none", 4, 1, 2048, checkpointing="true"
    )
    # auto on the CPU: no checkpointing; the bench's --checkpointing is lowtune's setting, and changes no number.
    assert (ours.checkpointing, checkpointed.checkpointing) == ("off", "on, all 2 of 2 layers, inputs kept")
    assert checkpointed.last_loss == pytest.approx(ours.last_loss, rel=1e-5)
    for measured in (tutorial, ours):
        assert measured.tokens_per_second > 0 and measured.steps_timed == 3 and measured.peak_gib > 0
    assert tutorial.tokens_per_step < ours.tokens_per_step <= 2048
    # The same weights (LoRA B starts at zero) and records: two ways to compute one loss.
    assert ours.loss_same_samples == pytest.approx(tutorial.loss_same_samples, rel=1e-2)
    assert ours.planned_peak_gib is not None and tutorial.planned_peak_gib is None


def test_both_recipes_take_records_times_accumulation(tiny_qwen2, qwen_tokenizer, rows):
    tutorial = tutorial_recipe(fresh_model(tiny_qwen2), qwen_tokenizer, rows, "none", 4, 1, batch=(2, 3))
    ours = lowtune_recipe(fresh_model(tiny_qwen2), qwen_tokenizer, rows, "none", 4, 1, batch=(2, 3))
    record_tokens = sum(len(row["input_ids"]) for row in rows) / len(rows)
    for measured in (tutorial, ours):  # six records a step, whatever each recipe does with them
        assert measured.tokens_per_step == pytest.approx(6 * record_tokens, rel=0.5)
    assert "2 records per micro-batch (padded, similar lengths together), 3 per step" in ours.batching


def test_regimes_read_from_the_command_line():
    assert Regime.parse("8x2") == Regime(records=8, accumulation=2) and Regime.parse("8x2").name == "8 x 2 records"
    assert Regime.parse("16384") == Regime(tokens=16384) and Regime(tokens=16384).name == "16,384 tokens"
    assert Regime.parse("2x4").arguments() == ["--batch", "2x4"]
    for bad in ("8x", "0x2", "eight", "-5"):
        with pytest.raises(UserError, match="cannot read the batch"):
            Regime.parse(bad)


def test_each_recipe_gets_its_own_options():
    assert _recipe_options("tutorial", 0.0, "false") == ["--dropout", "0.0"]
    assert _recipe_options("lowtune offload", 0.0, "false") == ["--dropout", "0.0", "--checkpointing", "offload"]
    assert _recipe_options("lowtune", 0.1, "offload")[-1] == "auto"
    assert _recipe_options("unsloth", 0.1, "false") == ["--checkpointing", "false"]  # its dropout is always 0


def test_result_lines_and_table():
    measured = {
        "tokens_per_second": 500.0,
        "peak_gib": 8.4,
        "planned_peak_gib": None,
        "loss_same_samples": 12.8,
        "tokens_per_step": 1151.0,
    }
    ours = dict(measured, tokens_per_second=10_000.0, planned_peak_gib=12.8)
    offload = dict(ours, tokens_per_second=6_000.0, peak_gib=6.1)
    peer = dict(measured, tokens_per_second=4_000.0)
    recipes = {"tutorial": measured, "lowtune": ours, lowtune_name("offload"): offload, "unsloth": peer}
    line = _result_line("4bit", Regime(records=8, accumulation=2), recipes, 10, None)
    assert line["ratio"] == 20.0 and line["seed_tok_s"] == 500.0 and line["plan_gib"] == 12.8
    assert line["regime"] == "8 x 2 records" and line["records_per_step"] == 16 and line["tokens_per_batch"] is None
    assert line["lowtune_over_unsloth"] == 2.5 and line["lowtune_offload_over_unsloth"] == 1.5
    assert line["layers"] == 32 and "torch" in line["versions"]
    table = results_table([line, _result_line("4bit", Regime(tokens=16384), {"lowtune": ours, "unsloth": None}, 10, 2)])
    assert table.row_count == 6
    assert [column.header for column in table.columns][:6] == [
        "regime",
        "mode",
        "recipe",
        "tokens/s",
        "x tutorial",
        "x unsloth",
    ]


def test_peer_rows_keep_records_whole(rows):
    packed = concatenated_rows(rows, 64)
    assert all(len(row["input_ids"]) <= 64 for row in packed)
    assert sum(len(row["input_ids"]) for row in packed) <= sum(len(row["input_ids"]) for row in rows)
    assert all(row["labels"][0] == -100 for row in packed)
    assert SEVEN_PROJECTIONS[0] == "q_proj"
