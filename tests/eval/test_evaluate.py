"""`lowtune eval` on the tiny memorising run: finite metrics, the right held-out records, replies that stop."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from PIL import Image
from rich.console import Console

from lowtune.data.read import Message, read_examples
from lowtune.data.split import split_examples
from lowtune.errors import UserError
from lowtune.eval.evaluate import (
    evaluate_run,
    generate,
    held_out_examples,
    results_table,
    sample_generations,
)
from lowtune.eval.plots import plot_losses
from lowtune.infer.session import ChatModel
from tests.conftest import MEMORISE, tiny_config, write_jsonl


@pytest.fixture(scope="module")
def chat_model(tiny_run) -> ChatModel:
    return ChatModel.from_adapter(tiny_run)


def test_evaluate_run_scores_the_adapter_beside_the_base(tmp_path, tiny_run):
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard"))
    data = write_jsonl(tmp_path / "held_out.jsonl", MEMORISE)
    results = evaluate_run(run, data=data, base=True, max_new_tokens=16)
    adapter, base = results["models"]["adapter"], results["models"]["base"]
    for metrics in (adapter, base):
        assert all(math.isfinite(metrics[key]) for key in ("eval_loss", "perplexity", "stop_rate", "mean_new_tokens"))
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
        assert metrics["zh"]["records"] == 3 and metrics["en"]["records"] == 1
    # The adapter memorised these replies: exact answers that end their turn; the random base model does not.
    assert adapter["stop_rate"] == 1.0 and adapter["zh"]["bleu4"] == pytest.approx(100)
    assert adapter["en"]["rouge_l"] == pytest.approx(100) and adapter["eval_loss"] < base["eval_loss"]
    assert results["records"] == 4 and results["data"] == str(data)
    assert json.loads((run / "eval_results.json").read_text(encoding="utf-8")) == results
    samples = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["reference"] for s in samples] == [r["output"] for r in MEMORISE]
    assert all(s["adapter"]["response"] == s["reference"] and s["adapter"]["stopped"] for s in samples)
    assert {"response", "stopped", "new_tokens", "language", "bleu4", "rouge_l"} <= samples[0]["base"].keys()
    console = Console(record=True, width=160)
    console.print(results_table(results))
    table = console.export_text()
    assert "stop rate" in table and "BLEU-4 zh" in table and "base" in table


def test_replies_that_reach_the_token_limit_have_not_stopped(chat_model):
    conversations = [[Message("user", record["instruction"])] for record in MEMORISE]
    im_end = chat_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    full = generate(chat_model.model, chat_model.chat_format, conversations, max_new_tokens=24, batch_size=4)
    assert [reply.text for reply in full] == [record["output"] for record in MEMORISE]
    assert all(reply.stopped and reply.ids[-1] == im_end for reply in full)
    cut = generate(chat_model.model, chat_model.chat_format, conversations, max_new_tokens=2)
    assert all(not reply.stopped and len(reply.ids) == 2 for reply in cut)


def test_sample_generations_for_the_report(chat_model, tmp_path):
    examples = read_examples([str(write_jsonl(tmp_path / "m.jsonl", MEMORISE))])
    samples = sample_generations(chat_model.model, chat_model.chat_format, examples, count=2, max_new_tokens=24)
    assert samples == [
        {"prompt": r["instruction"], "reference": r["output"], "response": r["output"], "stopped": True}
        for r in MEMORISE[:2]
    ]


def test_batched_generation_matches_one_at_a_time(chat_model):
    conversations = [[Message("user", text)] for text in ("皇上驾到！", "Who are you? Tell me more.", "hi")]
    batched = generate(chat_model.model, chat_model.chat_format, conversations, max_new_tokens=12, batch_size=3)
    single = generate(chat_model.model, chat_model.chat_format, conversations, max_new_tokens=12, batch_size=1)
    assert [reply.ids for reply in batched] == [reply.ids for reply in single]


def test_held_out_records_come_from_data_then_eval_files_then_the_training_split(tmp_path, tiny_qwen2):
    data = write_jsonl(tmp_path / "train.jsonl", MEMORISE)
    extra = write_jsonl(tmp_path / "extra.jsonl", MEMORISE[:1])
    config = tiny_config(tiny_qwen2, data, tmp_path / "run", seed=7)
    with pytest.raises(UserError, match="no held-out records"):
        held_out_examples(config)
    config.data.val_size = 2
    examples, described = held_out_examples(config)
    assert examples == split_examples(read_examples([str(data)]), 2, 7)[1] and "val_size 2" in described
    config.data.eval_files = [str(extra)]
    assert held_out_examples(config)[0] == read_examples([str(extra)])
    assert held_out_examples(config, data)[0] == read_examples([str(data)])


def test_loss_figure_of_a_run(tmp_path, tiny_run):
    history = json.loads((tiny_run / "trainer_state.json").read_text())["log_history"]
    history += [{"eval_loss": 1.0, "step": 10}, {"eval_loss": 0.5, "step": 20}]
    path = plot_losses(history, tmp_path / "loss.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (700, 400)
    with Image.open(plot_losses([], tmp_path / "empty.png")) as image:
        assert image.format == "PNG"
