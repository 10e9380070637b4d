"""export/verify.py: greedy agreement and KL of one chat model against another, along the reference's answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lowtune.data.read import Message
from lowtune.export.verify import Comparison, Limits, compare
from lowtune.infer.session import ChatModel
from tests.export.conftest import GREEDY, PROMPTS

CONVERSATIONS = [[Message("user", prompt)] for prompt in PROMPTS]


def test_a_model_against_itself_agrees_everywhere_with_no_divergence(adapter_model):
    comparison = compare(adapter_model, adapter_model, CONVERSATIONS, max_new_tokens=8)
    assert comparison.prompts == len(PROMPTS) and len(PROMPTS) <= comparison.positions <= 8 * len(PROMPTS)
    assert comparison.greedy_agreement == 1.0 and comparison.mean_kl == 0.0 and comparison.max_kl == 0.0


def test_the_figures_are_those_computed_by_hand_for_the_base_without_its_adapter(adapter_model, tiny_qwen2):
    plain = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    base = ChatModel(plain, adapter_model.tokenizer, adapter_model.chat_format)
    comparison = compare(adapter_model, base, CONVERSATIONS, max_new_tokens=GREEDY.max_new_tokens)
    agreeing, kls = 0, []
    for messages in CONVERSATIONS:
        prompt = adapter_model.chat_format.encode_prompt(messages)
        answer = adapter_model.generate_ids(prompt, GREEDY)
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            p = adapter_model.model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
            q = base.model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        kls += F.kl_div(q, p, log_target=True, reduction="none").sum(-1).tolist()  # KL(p || q)
        agreeing += int((p.argmax(-1) == q.argmax(-1)).sum())
    assert comparison.positions == len(kls)
    assert comparison.greedy_agreement == agreeing / len(kls) < 0.5  # the memorised answers need the adapter
    assert comparison.mean_kl == pytest.approx(sum(kls) / len(kls), rel=1e-4) and comparison.mean_kl > 1
    assert comparison.max_kl == pytest.approx(max(kls), rel=1e-4)


@pytest.mark.parametrize(
    ("kl", "agreement", "crossed"),
    [(0.01, 0.95, []), (0.2, 0.95, ["mean KL"]), (0.01, 0.5, ["greedy agreement"]), (math.nan, 1.0, ["mean KL"])],
)
def test_limits_name_what_a_comparison_crosses(kl, agreement, crossed):
    found = Limits(max_kl=0.05, min_agreement=0.9).crossed(Comparison(4, 40, agreement, kl, kl))
    assert [text.split(" ")[0] + " " + text.split(" ")[1] for text in found] == crossed
