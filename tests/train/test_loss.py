"""The hidden-state loss equals transformers' own loss, and its hand-written gradient equals autograd's."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lowtune.train import loss as loss_module
from lowtune.train.loss import ChunkedLinearCrossEntropy, causal_lm_loss, install_hidden_state_loss


def test_chunked_cross_entropy_matches_autograd(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 50 * 7)  # 7 rows per chunk: several chunks, one ragged
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (23,))
    ours = ChunkedLinearCrossEntropy.apply(hidden, weight, targets)
    (grad_ours,) = torch.autograd.grad(ours * 3.0, hidden)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (grad_reference,) = torch.autograd.grad(reference * 3.0, hidden)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-6, atol=1e-6)


def test_causal_lm_loss_shifts_and_ignores_masked_labels():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    weight = torch.randn(11, 8)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    logits = hidden @ weight.T
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(causal_lm_loss(hidden, labels, weight), reference)
    torch.testing.assert_close(causal_lm_loss(hidden, labels, weight, num_items_in_batch=8), reference * 4 / 8)


@pytest.mark.parametrize("num_items", [None, 8])
def test_masked_loss_over_every_position_equals_the_selected_one(monkeypatch, num_items):
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 11 * 3)  # 3 rows per chunk: ignored rows in every chunk
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, -100, 7], [-100, 1, 2, -100, -100, 5]])
    losses, grads = [], []
    for kernel in ("chunked", "masked"):
        loss = causal_lm_loss(hidden, labels, weight, num_items, kernel)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, hidden)[0])
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])
    assert grads[1][0, 0].abs().sum() == 0  # position 0 predicts an ignored label: no gradient


def test_model_loss_and_lora_gradients_equal_transformers(tiny_qwen2):
    torch.manual_seed(0)
    input_ids = torch.randint(0, 1000, (2, 12))
    labels = input_ids.clone()
    labels[:, :5] = -100
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels[1, 9:] = -100

    def loss_and_grads(hidden_state_loss: bool):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if hidden_state_loss:
            install_hidden_state_loss(model.get_base_model(), "chunked")
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    loss_ours, grads_ours = loss_and_grads(True)
    loss_reference, grads_reference = loss_and_grads(False)
    torch.testing.assert_close(loss_ours, loss_reference, rtol=1e-5, atol=1e-6)
    assert grads_ours.keys() == grads_reference.keys()
    for name in grads_ours:
        scale = grads_reference[name].abs().max()
        torch.testing.assert_close(grads_ours[name], grads_reference[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_without_labels_the_model_still_returns_logits(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).requires_grad_(False)
    install_hidden_state_loss(model)
    output = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert output.logits.shape == (1, 3, model.config.vocab_size)


def test_a_trained_output_layer_keeps_transformers_loss_and_packing_still_holds(tiny_qwen2, qwen_tokenizer):
    from lowtune.data.pack import PackedCollator, PaddedCollator
    from lowtune.data.read import Message
    from lowtune.data.templates import QwenFormat

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)  # every weight trainable
    with pytest.raises(RuntimeError, match="frozen linear output layer"):
        install_hidden_state_loss(model, "chunked")  # the fused loss gives the head no gradient
    install_hidden_state_loss(model, "transformers")
    rows = []
    for question, answer in (("皇上驾到！", "皇上万福金安。"), ("你是谁？", "家父是大理寺少卿甄远道。")):
        input_ids, labels = QwenFormat(qwen_tokenizer).encode([Message("user", question), Message("assistant", answer)])
        rows.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    with torch.no_grad():
        padded = model(**PaddedCollator(qwen_tokenizer.pad_token_id)(rows), num_items_in_batch=1).loss
        packed = model(**PackedCollator()(rows), num_items_in_batch=1).loss
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-4)
