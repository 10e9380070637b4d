"""The `seed` and `qwen` chat formats, token for token against independent reimplementations on tiktoken.

`seed` must reproduce the Qwen-7B-Chat tutorial's `process_func` (datawhalechina/self-llm), which ran Qwen's
slow QWenTokenizer: NFC normalization, then tiktoken with special tokens parsed from the text. `qwen` must
reproduce Qwen's `make_context`, which tokenizes role, newline and content apart, never parsing specials in
content.
"""

from __future__ import annotations

import json
import unicodedata
from importlib import resources

import pytest

from lowtune.data.encode import encode_records
from lowtune.data.read import Message
from lowtune.data.templates import build_chat_format

ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
TUTORIAL_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."
QWEN_SYSTEM = "You are a helpful assistant."
# Content that spells special tokens: the tutorial parses them as specials, make_context does not.
TRICKY = [
    {"instruction": "写出<|im_end|>这个词。", "input": "", "output": "好的：<|im_end|> 和 <|endoftext|>。"},
    {"instruction": "  前后有空格  ", "input": "补充\n", "output": "\n换行开头，结尾空格 "},
]


def bundled_records() -> list[dict[str, str]]:
    path = resources.files("lowtune.data") / "resources" / "huanhuan.json"
    return json.loads(path.read_text(encoding="utf-8"))


def slow_tokenizer_ids(encoding, text: str, nfc: bool = True) -> list[int]:
    """What `QWenTokenizer(text, add_special_tokens=False)` returns: NFC, then tiktoken, specials allowed."""
    return encoding.encode(unicodedata.normalize("NFC", text) if nfc else text, allowed_special="all")


def process_func(encoding, example: dict[str, str], max_length: int, nfc: bool = True) -> dict[str, list[int]]:
    """The tutorial's process_func, from its text; pad_token_id is <|endoftext|>."""
    system_and_user = (
        TUTORIAL_SYSTEM + "<|im_end|>" + "\n<|im_start|>user\n" + example["instruction"] + example["input"]
    )
    prompt = "\n".join(["<|im_start|>system", system_and_user + "<|im_end|>\n"]).strip()
    instruction = slow_tokenizer_ids(encoding, prompt, nfc)
    response = slow_tokenizer_ids(encoding, "<|im_start|>assistant\n" + example["output"] + "<|im_end|>\n", nfc)
    input_ids = instruction + response + [ENDOFTEXT_ID]
    attention_mask = [1] * len(input_ids)
    labels = [-100] * len(instruction) + response + [ENDOFTEXT_ID]
    if len(input_ids) > max_length:
        input_ids, attention_mask, labels = (part[:max_length] for part in (input_ids, attention_mask, labels))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    return bundled_records() + TRICKY


@pytest.mark.parametrize("max_length", [384, 48])
def test_seed_equals_the_tutorials_process_func(qwen_tokenizer, qwen_tiktoken, records, max_length):
    rows = encode_records(records, qwen_tokenizer, template="seed", max_length=max_length)
    expected = [process_func(qwen_tiktoken, record, max_length) for record in records]
    # The tutorial keeps rows that truncation left with nothing to learn; lowtune drops them (and says so).
    kept = [row for row in expected if any(label != -100 for label in row["labels"])]
    assert rows == kept
    truncated = sum(len(row["input_ids"]) == max_length for row in rows)
    if max_length == 384:
        assert kept == expected and truncated == 0
    else:
        assert truncated > 100  # the cut itself is exercised


def test_seed_on_the_bundled_data_is_cut_nowhere(qwen_tokenizer, qwen_tiktoken):
    records = bundled_records()
    assert len(records) == 3729
    assert max(len(process_func(qwen_tiktoken, r, 10**6)["input_ids"]) for r in records) <= 384


def test_seed_differs_from_the_tutorial_only_by_its_nfc_step(qwen_tokenizer, qwen_tiktoken):
    """lowtune's tokenizer is tiktoken exactly; Qwen's slow tokenizer NFC-normalizes first. Only text that NFC
    changes (none of the bundled records) tells them apart."""
    record = {"instruction": "Cafe\u0301?", "input": "", "output": "\uf900"}
    rows = encode_records([record], qwen_tokenizer, template="seed", max_length=384)
    assert rows == [process_func(qwen_tiktoken, record, 384, nfc=False)]
    assert rows != [process_func(qwen_tiktoken, record, 384)]


def make_context(encoding, query: str, system: str = QWEN_SYSTEM) -> list[int]:
    """Qwen's make_context (chat_format chatml, no history), from qwen_generation_utils.py."""

    def ordinary(text: str) -> list[int]:  # tokenizer.encode(text, allowed_special=set())
        return encoding.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())

    newline = ordinary("\n")

    def tokenize_str(role: str, content: str) -> list[int]:
        return ordinary(role) + newline + ordinary(content)

    system_tokens = [IM_START_ID] + tokenize_str("system", system) + [IM_END_ID]
    user_tokens = [IM_START_ID] + tokenize_str("user", query) + [IM_END_ID]
    return system_tokens + newline + user_tokens + newline + [IM_START_ID] + ordinary("assistant") + newline


def query_of(record: dict[str, str]) -> str:
    return "\n".join(part for part in (record["instruction"], record["input"]) if part)


def test_qwen_prompt_equals_make_context(qwen_tokenizer, qwen_tiktoken, records):
    chat_format = build_chat_format("qwen", qwen_tokenizer)
    for record in records:
        prompt = chat_format.encode_prompt([Message("user", query_of(record))])
        assert prompt == make_context(qwen_tiktoken, query_of(record)), record


def test_qwen_trains_the_reply_and_its_im_end_only(qwen_tokenizer, qwen_tiktoken, records):
    rows = encode_records(records, qwen_tokenizer, template="qwen", max_length=4096)
    assert len(rows) == len(records)
    newline = qwen_tiktoken.encode("\n")
    for record, row in zip(records, rows, strict=True):
        context = make_context(qwen_tiktoken, query_of(record))
        reply = qwen_tiktoken.encode(record["output"], disallowed_special=()) + [IM_END_ID]
        assert row["input_ids"] == context + reply + newline
        assert row["labels"] == [-100] * len(context) + reply + [-100] * len(newline)
