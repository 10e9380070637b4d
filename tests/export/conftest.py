"""What the export tests share: the tiny run as base + adapter, the prompts they answer, greedy decoding."""

from __future__ import annotations

import pytest

from lowtune.infer.session import ChatModel, GenerationSettings
from tests.conftest import MEMORISE

PROMPTS = [record["instruction"] for record in MEMORISE] + ["你好", "What is the capital of France?"]
GREEDY = GenerationSettings(max_new_tokens=20)


@pytest.fixture(scope="module")
def adapter_model(tiny_run) -> ChatModel:
    return ChatModel.from_adapter(tiny_run)
