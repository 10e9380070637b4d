"""The fast Qwen tokenizer gives tiktoken's ids exactly: bundled records, random Unicode, after a save."""

from __future__ import annotations

import json
import random
import unicodedata
from importlib import resources

import pytest
from transformers import PreTrainedTokenizerFast

from lowtune.model.qwen_tokenizer import ENDOFTEXT, IM_END, IM_START

SPECIAL_IDS = {
    ENDOFTEXT: 151643,
    IM_START: 151644,
    IM_END: 151645,
    "<|extra_0|>": 151646,
    "<|extra_204|>": 151850,
}
# Pieces that stress the regex and the byte-level mapping: digits, newlines, runs of spaces, apostrophes,
# combining marks, Hangul jamo, CJK compatibility ideographs, astral characters, special tokens whole and cut.
PIECES = [
    "\n",
    "\r\n",
    "  ",
    "\t",
    " 123",
    "'s",
    "'LL",
    "e\u0301",
    "\u1100\u1161",
    "\uf900",
    "\U0001f600",
    "<|im_end|>",
    "<|endoftext|>",
    "<|extra_7|>",
    "<|im_",
    "|>",
    "甄嬛",
    "本宫",
    "Ⅻ",
    "\u00a0",
    "\u200b",
]


def bundled_records() -> list[dict[str, str]]:
    path = resources.files("lowtune.data") / "resources" / "huanhuan.json"
    return json.loads(path.read_text(encoding="utf-8"))


def chatml(record: dict[str, str]) -> str:
    return (
        f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n{IM_START}user\n{record['instruction']}"
        f"{record['input']}{IM_END}\n{IM_START}assistant\n{record['output']}{IM_END}\n"
    )


def random_strings(count: int, seed: int = 0) -> list[str]:
    """Seeded random text: any code point but surrogates (not encodable), mixed with the stress pieces."""
    rng = random.Random(seed)
    strings = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 12)):
            roll = rng.random()
            if roll < 0.3:
                parts.append(rng.choice(PIECES))
            elif roll < 0.6:
                parts.append(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0x4E00, 0x9FFF)])))
            else:
                code = rng.randint(0, 0x10FFFF)
                parts.append(chr(code) if not 0xD800 <= code <= 0xDFFF else "x")
        strings.append("".join(parts))
    return strings


def texts_of_bundled_data() -> list[str]:
    records = bundled_records()
    return [text for r in records for text in (r["instruction"], r["input"], r["output"], chatml(r))]


def assert_same_ids(tokenizer, encoding, texts: list[str]) -> None:
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, ours, strict=True):
        assert ids == encoding.encode(text, allowed_special="all"), repr(text)


def test_equals_tiktoken_on_every_bundled_record(qwen_tokenizer, qwen_tiktoken):
    texts = texts_of_bundled_data()
    assert len(texts) == 4 * 3729
    assert_same_ids(qwen_tokenizer, qwen_tiktoken, texts)


def test_equals_tiktoken_on_random_unicode(qwen_tokenizer, qwen_tiktoken):
    assert_same_ids(qwen_tokenizer, qwen_tiktoken, random_strings(4000))


def test_equals_tiktoken_after_save_and_reload(qwen_tokenizer, qwen_tiktoken, tmp_path):
    qwen_tokenizer.save_pretrained(tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert reloaded.backend_tokenizer.normalizer is None
    assert_same_ids(reloaded, qwen_tiktoken, random_strings(1000, seed=1) + texts_of_bundled_data()[::7])
    assert reloaded.chat_template == qwen_tokenizer.chat_template


@pytest.mark.parametrize("token", sorted(SPECIAL_IDS))
def test_special_token_ids(qwen_tokenizer, token):
    assert qwen_tokenizer.convert_tokens_to_ids(token) == SPECIAL_IDS[token]
    assert qwen_tokenizer(token, add_special_tokens=False)["input_ids"] == [SPECIAL_IDS[token]]


def test_eos_and_pad_are_endoftext(qwen_tokenizer):
    assert qwen_tokenizer.eos_token == qwen_tokenizer.pad_token == ENDOFTEXT
    assert qwen_tokenizer.eos_token_id == qwen_tokenizer.pad_token_id == 151643
    assert qwen_tokenizer("hi")["input_ids"] == qwen_tokenizer("hi", add_special_tokens=False)["input_ids"]


def test_nfc_changes_no_bundled_text():
    """Qwen-1's slow tokenizer NFC-normalizes before tiktoken; on the bundled data that changes nothing."""
    texts = texts_of_bundled_data()
    assert all(unicodedata.normalize("NFC", text) == text for text in texts)
