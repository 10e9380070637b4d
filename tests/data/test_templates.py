"""Chat formats and label masks: only assistant replies and their end-of-turn token are trained."""

from __future__ import annotations

import pytest

from lowtune.data.encode import encode_examples, encode_records
from lowtune.data.read import Example, Message
from lowtune.data.templates import (
    IGNORE_INDEX,
    QwenFormat,
    SeedFormat,
    TokenizerFormat,
    build_chat_format,
    load_chat_format,
)
from lowtune.errors import UserError

# SmolLM2-Instruct's template: it adds its own system prompt when a conversation has none.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are SmolLM<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ALPACA = [Message("user", "皇上驾到！"), Message("assistant", "皇上万福金安。")]
WITH_SYSTEM = [Message("system", "现在你要扮演甄嬛"), *ALPACA]
MULTI_TURN = [
    Message("user", "hello"),
    Message("assistant", "Hi there."),
    Message("user", "你是谁？"),
    Message("assistant", "家父是大理寺少卿甄远道。"),
    Message("user", "ok"),
    Message("assistant", "好。"),
]


def trained_spans(tokenizer, input_ids, labels) -> list[str]:
    """Decoded runs of consecutive trained positions."""
    spans, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    return [tokenizer.decode(span) for span in spans]


def formats(tokenizer):
    return {
        "qwen": QwenFormat(tokenizer),
        "tokenizer-chatml": TokenizerFormat(tokenizer),
        "tokenizer-smol": TokenizerFormat(tokenizer, template=SMOL_TEMPLATE),
    }


@pytest.mark.parametrize("name", ["qwen", "tokenizer-chatml", "tokenizer-smol"])
@pytest.mark.parametrize("messages", [ALPACA, WITH_SYSTEM, MULTI_TURN], ids=["alpaca", "system", "multi-turn"])
def test_labels_cover_exactly_the_replies_and_their_end_token(qwen_tokenizer, name, messages):
    chat_format = formats(qwen_tokenizer)[name]
    input_ids, labels = chat_format.encode(messages)
    expected = [m.content + "<|im_end|>" for m in messages if m.role == "assistant"]
    assert trained_spans(qwen_tokenizer, input_ids, labels) == expected


@pytest.mark.parametrize("name", ["qwen", "tokenizer-chatml", "tokenizer-smol"])
def test_prompt_for_generation_is_the_training_prefix(qwen_tokenizer, name):
    """Chat tokenizes the prompt exactly as training did, so the model continues where it learned to."""
    chat_format = formats(qwen_tokenizer)[name]
    input_ids, labels = chat_format.encode(MULTI_TURN)
    prompt = chat_format.encode_prompt(MULTI_TURN[:-1])
    assert input_ids[: len(prompt)] == prompt
    assert labels[len(prompt)] != IGNORE_INDEX and labels[len(prompt) - 1] == IGNORE_INDEX
    assert qwen_tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_qwen_format_renders_make_context_text_and_default_system(qwen_tokenizer):
    input_ids, _ = QwenFormat(qwen_tokenizer).encode(ALPACA)
    assert qwen_tokenizer.decode(input_ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n皇上驾到！<|im_end|>\n"
        "<|im_start|>assistant\n皇上万福金安。<|im_end|>\n"
    )


def test_special_token_text_in_a_message_is_not_a_control_token(qwen_tokenizer):
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = [Message("user", "say <|im_end|> please"), Message("assistant", "no")]
    input_ids, _ = QwenFormat(qwen_tokenizer, system="S").encode(messages)
    assert input_ids.count(im_end) == 3  # system, user and assistant turn ends only


def test_seed_format_trains_the_assistant_header_and_the_extra_endoftext(qwen_tokenizer):
    input_ids, labels = SeedFormat(qwen_tokenizer).encode(ALPACA)
    text = qwen_tokenizer.decode(input_ids)
    assert "<|im_end|><|im_start|>assistant" in text  # the tutorial's missing newline
    assert trained_spans(qwen_tokenizer, input_ids, labels) == [
        "<|im_start|>assistant\n皇上万福金安。<|im_end|>\n<|endoftext|>"
    ]


def test_auto_picks_the_tokenizers_template_else_qwen(qwen_tokenizer, tiny_llama):
    from lowtune.model.load import read_tokenizer

    assert build_chat_format("auto", qwen_tokenizer).name == "tokenizer"
    assert build_chat_format("auto", read_tokenizer(tiny_llama)).name == "qwen"


def test_end_of_turn_is_detected_from_the_template(qwen_tokenizer):
    assert TokenizerFormat(qwen_tokenizer, template=SMOL_TEMPLATE).end_of_turn == "<|im_end|>"
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert TokenizerFormat(qwen_tokenizer).stop_token_ids == [im_end, qwen_tokenizer.eos_token_id]


def test_a_template_that_rewrites_history_is_refused(qwen_tokenizer):
    last_turn_only = (
        "{% for message in messages[-2:] %}{{ '<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(UserError, match="rewrites earlier messages"):
        TokenizerFormat(qwen_tokenizer, template=last_turn_only).encode(MULTI_TURN)


def test_saved_format_is_what_inference_reads(qwen_tokenizer, tmp_path):
    for chat_format in [*formats(qwen_tokenizer).values(), SeedFormat(qwen_tokenizer, system="S")]:
        chat_format.save(tmp_path)
        loaded = load_chat_format(tmp_path, qwen_tokenizer)
        assert (loaded.name, loaded.system, loaded.end_of_turn) == (
            chat_format.name,
            chat_format.system,
            chat_format.end_of_turn,
        )
        assert loaded.encode(MULTI_TURN) == chat_format.encode(MULTI_TURN)


def test_truncation_drops_records_left_without_trained_tokens(qwen_tokenizer):
    long_prompt = Example((Message("user", "很长的问题" * 40), Message("assistant", "答")), "f:1")
    short = Example(tuple(ALPACA), "f:2")
    encoded = encode_examples([long_prompt, short], QwenFormat(qwen_tokenizer), max_length=40)
    assert encoded.dropped == ["f:1"] and encoded.truncated == 1 and len(encoded.rows) == 1
    with pytest.raises(UserError, match="every record was dropped"):
        encode_examples([long_prompt], QwenFormat(qwen_tokenizer), max_length=40)


def test_cut_record_keeps_its_remaining_trained_tokens(qwen_tokenizer):
    example = Example((Message("user", "q"), Message("assistant", "一二三四五六七八九十" * 5)), "f:1")
    (row,) = encode_examples([example], QwenFormat(qwen_tokenizer), max_length=30).rows
    assert len(row["input_ids"]) == 30 and row["labels"][-1] != IGNORE_INDEX


def test_encode_records_api(qwen_tokenizer):
    rows = encode_records(
        [
            {"instruction": "q", "input": "", "output": "a"},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "b"}]},
        ],
        qwen_tokenizer,
        template="qwen",
        system="S",
        max_length=64,
    )
    assert [sorted(row) for row in rows] == [["attention_mask", "input_ids", "labels"]] * 2
    assert trained_spans(qwen_tokenizer, rows[1]["input_ids"], rows[1]["labels"]) == ["b<|im_end|>"]
    with pytest.raises(UserError, match="record 0: missing field 'output'"):
        encode_records([{"instruction": "q"}], qwen_tokenizer)
