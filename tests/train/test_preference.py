"""DPO and ORPO: the per-row log-probabilities, the reference pass, training on pairs, resume, bad preference input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lowtune.data.preference import PairRows, encode_pairs, read_pairs
from lowtune.data.templates import build_chat_format
from lowtune.errors import UserError
from lowtune.model.load import load_tokenizer
from lowtune.recipe import prepare, run
from lowtune.train import loss
from lowtune.train.loss import ChunkedLinearLogProbs
from lowtune.train.preference import PreferenceCollator, sequence_log_probs
from lowtune.train.trainer import prepare_model_and_collator
from tests.conftest import MEMORISE, tiny_config, write_jsonl

PAIRS = [
    {"prompt": record["instruction"], "chosen": record["output"], "rejected": other["output"]}
    for record, other in zip(MEMORISE, MEMORISE[1:] + MEMORISE[:1], strict=True)
]


def test_per_row_log_probs_match_the_full_log_softmax_in_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37, dtype=torch.float64)
    expected = (hidden @ weight.T).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    (expected_grad,) = torch.autograd.grad(expected, hidden, upstream)
    picked = ChunkedLinearLogProbs.apply(hidden, weight, targets)
    (grad,) = torch.autograd.grad(picked, hidden, upstream)
    torch.testing.assert_close(picked, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_chunks_do_not_change_the_per_row_log_probs(monkeypatch):
    torch.manual_seed(1)
    hidden, weight, targets = torch.randn(9, 8), torch.randn(30, 8), torch.randint(0, 30, (9,))
    whole = ChunkedLinearLogProbs.apply(hidden, weight, targets)
    monkeypatch.setattr(loss, "CHUNK_BYTES", 4 * 30 * 2)  # two rows a chunk
    torch.testing.assert_close(ChunkedLinearLogProbs.apply(hidden, weight, targets), whole)


@pytest.mark.parametrize("masked_chunk_rows", [2, 1000])
def test_masked_sequence_log_probs_equal_the_selected_ones_in_values_and_gradients(monkeypatch, masked_chunk_rows):
    """The CUDA graphs' form (every position, unlabelled ones weighing zero, small chunks) against the labelled
    positions selected: the same sums and token counts per sequence, and the same gradient to the hidden states."""
    monkeypatch.setattr(loss, "MASKED_CHUNK_BYTES", 4 * 30 * masked_chunk_rows)
    torch.manual_seed(2)
    hidden = torch.randn(1, 24, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64)
    labels = torch.randint(0, 30, (1, 24))
    labels[0, [0, 1, 2, 9, 10, 17, 22, 23]] = -100  # prompts, record starts and padding carry no label
    sequence_ids = torch.tensor([[0] * 9 + [1] * 8 + [2] * 5 + [0] * 2])  # three packed sequences, then padding
    upstream = torch.randn(3, dtype=torch.float64)
    results = []
    for masked in (False, True):
        out = loss.sequence_log_probs(hidden, labels, sequence_ids, 3, weight, masked=masked)
        (grad,) = torch.autograd.grad(out.logps, hidden, upstream)
        results.append((out.logps, out.tokens, grad))
    (selected, counts, selected_grad), (masked, masked_counts, masked_grad) = results
    assert counts.tolist() == [6, 6, 4] == masked_counts.tolist()
    torch.testing.assert_close(masked, selected)
    torch.testing.assert_close(masked_grad, selected_grad)
    assert masked_grad[0, [8, 16, 21, 22, 23]].abs().sum() == 0  # positions whose next token has no label


def test_a_pass_gives_the_loss_over_the_steps_pairs_and_their_sums_for_the_log():
    from types import SimpleNamespace

    from lowtune.train.preference import pair_outputs
    from lowtune.train.resolve import Objective

    policy = torch.tensor([-3.0, -5.0, -4.0, -2.0], dtype=torch.float64)
    reference = torch.tensor([-4.0, -4.0, -4.0, -4.0], dtype=torch.float64)

    def model(**batch):
        assert "reference_logps" not in batch and "num_items_in_batch" not in batch
        return SimpleNamespace(logps=policy, tokens=torch.ones(4))

    objective = Objective(method="dpo", weight=0.5)
    batch = {"reference_logps": reference, "num_items_in_batch": torch.tensor(4)}
    outputs = pair_outputs(model, batch, objective)
    chosen, rejected = 0.5 * torch.tensor([1.0, 0.0]), 0.5 * torch.tensor([-1.0, 2.0])
    expected = -torch.nn.functional.logsigmoid(chosen - rejected)
    torch.testing.assert_close(outputs["loss"], expected.sum() / 4)  # over the step's 4 pairs, not this batch's 2
    assert outputs["pairs"] == 2 and outputs["accuracy"] == 1  # the first pair's chosen reply is ahead
    torch.testing.assert_close(outputs["reward_margin"], (chosen - rejected).sum())
    alone = pair_outputs(model, {"reference_logps": reference}, objective)
    torch.testing.assert_close(alone["loss"], expected.mean())


def _model_and_pairs(tmp_path, tiny_qwen2, packed: bool):
    from lowtune.model.load import load_weights
    from lowtune.model.lora import attach_lora

    tmp_path.mkdir(exist_ok=True)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = tiny_config(tiny_qwen2, data, tmp_path / "run", max_steps=1, method="dpo", packing=packed)
    setup = prepare(config)
    model = load_weights(config.model, setup.resolved.loading)
    model = attach_lora(model, config.lora, setup.resolved.lora_targets, setup.resolved.checkpointing)
    collate = PreferenceCollator(prepare_model_and_collator(model, setup.resolved, setup.tokenizer), packed)
    _model_and_pairs.resolved = setup.resolved
    return model, PairRows(setup.data.rows), collate


@pytest.mark.parametrize("packed", [False, True])
def test_the_reference_pass_of_a_fresh_adapter_is_the_base_without_it(tmp_path, tiny_qwen2, packed):
    from lowtune.data.pack import PackedCollator, PaddedCollator
    from lowtune.model.load import load_weights
    from lowtune.train.loss import install_hidden_state_loss

    model, rows, collate = _model_and_pairs(tmp_path, tiny_qwen2, packed)
    fresh, tokens = sequence_log_probs(model, rows, collate, pairs_per_batch=3)  # through the fused LoRA path
    plain = load_weights(tiny_config(tiny_qwen2, tmp_path, tmp_path).model, _model_and_pairs.resolved.loading)
    plain.requires_grad_(False)
    install_hidden_state_loss(plain)
    plain_collate = PreferenceCollator(PackedCollator() if packed else PaddedCollator(0), packed)
    base, _ = sequence_log_probs(plain, rows, plain_collate, pairs_per_batch=2)
    assert len(base) == 2 * len(PAIRS) and (base < 0).all()
    assert tokens.tolist() == [sum(label != -100 for label in row["labels"][1:]) for row in rows]
    assert fresh == pytest.approx(base, abs=1e-4)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: no longer the base
            torch.nn.init.normal_(parameter, std=0.5)
    policy, _ = sequence_log_probs(model, rows, collate, pairs_per_batch=4)
    assert abs(policy - base).max() > 1e-3


def test_padded_and_packed_pairs_give_the_same_log_probs(tmp_path, tiny_qwen2):
    padded = sequence_log_probs(*_model_and_pairs(tmp_path / "a", tiny_qwen2, False), pairs_per_batch=4)[0]
    packed = sequence_log_probs(*_model_and_pairs(tmp_path / "b", tiny_qwen2, True), pairs_per_batch=4)[0]
    assert packed == pytest.approx(padded, abs=1e-4)


def _evaluations(output) -> list[dict]:
    state = json.loads((output / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "eval_accuracy" in entry]


@pytest.mark.parametrize(("method", "weight"), [("dpo", "beta=0.1"), ("orpo", "orpo_lambda=1")])
def test_training_on_pairs_raises_preference_accuracy(tmp_path, tiny_qwen2, method, weight):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    held_out = write_jsonl(tmp_path / "held.jsonl", PAIRS)
    settings = [f"data.eval_files=[{held_out}]", f"train.{weight}"]
    config = tiny_config(tiny_qwen2, data, tmp_path / "run", settings, max_steps=16, method=method)
    output = run(config)
    first, last = _evaluations(output)[0], _evaluations(output)[-1]
    assert last["eval_accuracy"] == 1.0 and last["eval_reward_margin"] > first["eval_reward_margin"]
    assert last["eval_loss"] < first["eval_loss"]
    summary = json.loads((output / "run_summary.json").read_text())
    assert summary["preference"]["last_eval"]["accuracy"] == 1.0 and summary["preference"]["pairs"] == 8
    resolved = (output / "resolved.yaml").read_text()
    assert f"method: {method} ({weight.split('=')[1]}" in resolved
    logged = [entry for entry in json.loads((output / "trainer_state.json").read_text())["log_history"]]
    assert any("reward_margin" in entry and "loss" in entry for entry in logged)
    report = (output / "report.md").read_text(encoding="utf-8")
    assert "| preference accuracy | 100% |" in report
    assert f"| {last['step']} | {last['eval_loss']:.4f} | 100% |" in report


def test_dpo_from_an_sft_adapter_starts_at_its_policy(tmp_path, tiny_qwen2):
    sft_data = write_jsonl(tmp_path / "sft.jsonl", MEMORISE)
    sft = run(tiny_config(tiny_qwen2, sft_data, tmp_path / "sft", max_steps=6))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = tiny_config(tiny_qwen2, pairs, tmp_path / "dpo", [f"data.eval_files=[{pairs}]"], max_steps=2, method="dpo")
    config.train.init_adapter = str(sft)
    output = run(config)
    # The reference is the SFT policy: at the start, DPO's rewards are zero (not the base's margins).
    first = _evaluations(output)[0]
    assert first["eval_rewards_chosen"] == pytest.approx(0, abs=1e-6) and first["eval_accuracy"] == 0.0
    start = load_file(str(sft / "adapter_model.safetensors"))
    trained = load_file(str(output / "adapter_model.safetensors"))
    assert any(not torch.equal(start[key], trained[key]) for key in start)


def test_init_adapter_with_other_lora_settings_is_refused(tmp_path, tiny_run, tiny_qwen2):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = tiny_config(tiny_qwen2, pairs, tmp_path / "dpo", ["lora.r=4"], max_steps=1, method="dpo")
    config.train.init_adapter = str(tiny_run)
    with pytest.raises(UserError, match="init_adapter was trained with lora"):
        prepare(config)


def test_resumed_dpo_gives_the_uninterrupted_adapter(tmp_path, tiny_qwen2):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 3)
    config = tiny_config(tiny_qwen2, data, tmp_path / "run", max_steps=4, save_steps=2, method="dpo")
    config.lora.dropout = 0.1  # resuming must restore the dropout generator too
    config.train.save_total_limit = None
    output = run(config)
    uninterrupted = load_file(str(output / "adapter_model.safetensors"))
    shutil.rmtree(output / "checkpoint-4")
    (output / "adapter_model.safetensors").unlink()
    run(config, resume="latest")
    resumed = load_file(str(output / "adapter_model.safetensors"))
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)


def test_pairs_encode_with_the_prompt_masked_and_only_the_final_reply_trained(tmp_path, tiny_qwen2):
    record = {
        "messages": [
            {"role": "user", "content": "你是谁？"},
            {"role": "assistant", "content": "臣妾甄嬛。"},
            {"role": "user", "content": "皇上驾到！"},
        ],
        "chosen": {"role": "assistant", "content": "皇上万福金安。"},
        "rejected": [{"role": "assistant", "content": "晴。"}],
    }
    pairs, _ = read_pairs([str(write_jsonl(tmp_path / "p.jsonl", [record]))], seed=0)
    chat_format = build_chat_format("qwen", load_tokenizer(tiny_config(tiny_qwen2, tmp_path, tmp_path).model))
    data = encode_pairs(pairs, chat_format, max_length=256)
    chosen, rejected = data.rows[0], data.rows[1]
    decode = chat_format.tokenizer.decode
    assert decode([t for t in chosen["labels"] if t != -100]).startswith("皇上万福金安。")
    assert decode([t for t in rejected["labels"] if t != -100]).startswith("晴。")
    assert "臣妾" not in decode([t for t in chosen["labels"] if t != -100])
    assert data.lengths == [len(chosen["input_ids"]) + len(rejected["input_ids"])]


BAD = [
    ({"prompt": "hi", "chosen": "a"}, "missing 'rejected'"),
    ({"instruction": "hi", "output": "a"}, "an SFT record: missing 'chosen' and 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "no 'prompt' or 'messages'"),
    ({"prompt": "hi", "chosen": "a", "rejected": "a"}, "the same reply"),
    ({"prompt": "hi", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "a",
      "rejected": "b"}, "must end with the user's turn"),
]  # fmt: skip


def test_bad_preference_records_are_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0]] + [record for record, _ in BAD])
    with pytest.raises(UserError) as error:
        read_pairs([str(path)], seed=0)
    text = str(error.value)
    for line, (_, message) in enumerate(BAD, start=2):
        assert f"{path}:{line}: " in text and message in text


def test_a_method_that_does_not_fit_the_data_says_so(tmp_path, tiny_qwen2):
    from lowtune.train.preflight import check_before_loading

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(UserError, match=r"(?s)pairs.jsonl:1: a preference record .* train.method: dpo or orpo"):
        check_before_loading(tiny_config(tiny_qwen2, pairs, tmp_path / "a"))
    sft = write_jsonl(tmp_path / "sft.jsonl", MEMORISE)
    with pytest.raises(UserError, match=r"sft.jsonl:1: an SFT record"):
        check_before_loading(tiny_config(tiny_qwen2, sft, tmp_path / "b", method="orpo"))


def test_settings_of_another_method_are_refused():
    from lowtune.config import load_config

    with pytest.raises(UserError, match="train.beta applies to train.method: dpo only"):
        load_config(None, ["train.method=orpo", "train.beta=0.2"])
    assert load_config(None, ["train.method=orpo", "train.orpo_lambda=0.2"]).train.orpo_lambda == 0.2
