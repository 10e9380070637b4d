"""Packed rows compute what padded batches compute: same loss, same LoRA gradients, no cross-record attention."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lowtune.data.pack import PackedCollator, PaddedCollator
from lowtune.data.read import Message
from lowtune.data.templates import QwenFormat
from lowtune.recipe import run
from lowtune.train import trainer as trainer_module
from lowtune.train.loss import install_hidden_state_loss
from tests.conftest import MEMORISE, tiny_config, write_jsonl

CONVERSATIONS = [
    [Message("user", "皇上驾到！"), Message("assistant", "皇上万福金安。")],
    [Message("user", "hello there, who are you?"), Message("assistant", "I am Zhen Huan, daughter of Zhen Yuandao.")],
    [Message("user", "一"), Message("assistant", "二"), Message("user", "三"), Message("assistant", "四五")],
]


def rows_for(tokenizer) -> list[dict[str, list[int]]]:
    rows = []
    for messages in CONVERSATIONS:
        input_ids, labels = QwenFormat(tokenizer).encode(messages)
        rows.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    return rows


def lora_model(folder):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    install_hidden_state_loss(model.get_base_model())
    return model


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, num_items_in_batch=None).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_rows_padded_for_cuda_graphs_give_the_packed_loss_and_gradients(tiny_qwen2, qwen_tokenizer):
    rows = rows_for(qwen_tokenizer)
    bucketed = PackedCollator(bucket=16)(rows)
    length = bucketed["input_ids"].shape[1]
    assert length % 16 == 0 and length - sum(len(r["input_ids"]) for r in rows) < 16
    assert bucketed["cu_seq_lens_q"].tolist()[-1] == length and len(bucketed["cu_seq_lens_q"]) == 4 + 1  # 3 + pad
    assert bucketed["max_length_q"] == length  # fixed per shape, as a graph needs
    assert bucketed["real_tokens"] == sum(len(r["input_ids"]) for r in rows)
    model = lora_model(tiny_qwen2)
    packed_loss, packed_grads = loss_and_grads(model, PackedCollator()(rows))
    install_hidden_state_loss(model.get_base_model(), "masked")
    bucketed_loss, bucketed_grads = loss_and_grads(model, bucketed)
    assert relative(bucketed_loss, packed_loss) < 1e-5
    for name, grad in packed_grads.items():
        assert relative(bucketed_grads[name], grad) < 1e-5, name


def test_packed_loss_and_lora_gradients_equal_padded(tiny_qwen2, qwen_tokenizer):
    rows = rows_for(qwen_tokenizer)
    model = lora_model(tiny_qwen2)
    padded_loss, padded_grads = loss_and_grads(model, PaddedCollator(qwen_tokenizer.pad_token_id)(rows))
    packed_loss, packed_grads = loss_and_grads(model, PackedCollator()(rows))
    assert relative(packed_loss, padded_loss) < 1e-5
    for name, grad in padded_grads.items():
        assert relative(packed_grads[name], grad) < 1e-5, name


def test_no_token_attends_across_a_record_boundary(tiny_qwen2, qwen_tokenizer):
    rows = rows_for(qwen_tokenizer)
    model = lora_model(tiny_qwen2).eval()
    decoder = model.get_base_model().get_decoder()

    def packed_hidden(batch_rows):
        batch = PackedCollator()(batch_rows)
        batch.pop("labels")
        with torch.no_grad():
            return decoder(**batch, use_cache=False).last_hidden_state[0]

    lengths = [len(row["input_ids"]) for row in rows]
    together = packed_hidden(rows)
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    for row, start, length in zip(rows, starts, lengths, strict=True):
        alone = packed_hidden([row])
        torch.testing.assert_close(together[start : start + length], alone, rtol=1e-5, atol=1e-5)
    changed = [rows[0], {**rows[1], "input_ids": [7] * lengths[1]}, rows[2]]
    after = packed_hidden(changed)
    torch.testing.assert_close(after[: lengths[0]], together[: lengths[0]])
    torch.testing.assert_close(after[starts[2] :], together[starts[2] :])
    assert not torch.allclose(after[starts[1] : starts[2]], together[starts[1] : starts[2]])


def test_packed_collator_restarts_positions_and_masks_each_first_label(qwen_tokenizer):
    rows = rows_for(qwen_tokenizer)
    batch = PackedCollator()(rows)
    lengths = [len(row["input_ids"]) for row in rows]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["cu_seq_lens_q"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch["max_length_q"] == max(lengths)
    positions = batch["position_ids"][0].tolist()
    assert positions[lengths[0]] == 0 and positions[lengths[0] - 1] == lengths[0] - 1
    for start in batch["cu_seq_lens_q"][:-1].tolist():
        assert batch["labels"][0, start] == -100


def transformers_loss(model, *choices):
    """The plain path: transformers' own loss whatever the run resolved."""
    install_hidden_state_loss(model, "transformers")


def test_fast_path_and_plain_path_give_the_same_loss_curve(tmp_path, tiny_qwen2, monkeypatch):
    """Packed rows + loss from hidden states vs padded batches + transformers' own loss, 20 steps each."""
    data = write_jsonl(tmp_path / "m.jsonl", MEMORISE * 3)
    curves = {}
    for name, packing in (("fast", True), ("plain", False)):
        with monkeypatch.context() as patch:
            if name == "plain":
                patch.setattr(trainer_module, "install_hidden_state_loss", transformers_loss)
            config = tiny_config(tiny_qwen2, data, tmp_path / name, max_steps=20, learning_rate=1e-2)
            config.train.packing = packing
            config.model.device_map = "cpu"
            output = run(config)
        state = json.loads((output / "trainer_state.json").read_text())
        curves[name] = torch.tensor([entry["loss"] for entry in state["log_history"] if "loss" in entry])
    assert len(curves["fast"]) == 20
    assert curves["fast"][-1] < 0.6 * curves["fast"][0]
    torch.testing.assert_close(curves["fast"], curves["plain"], rtol=1e-4, atol=1e-4)
