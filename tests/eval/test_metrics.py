"""BLEU-4 and ROUGE-L against values worked out by hand; the stop rate on crafted generations."""

from __future__ import annotations

import math

import pytest

from lowtune.data.templates import QwenFormat
from lowtune.eval.metrics import (
    corpus_bleu,
    language_of,
    reply_scores,
    rouge_l,
    score_replies,
    sentence_bleu,
    stop_rate,
    stopped,
)


def bleu4(precisions: list[float], hyp_len: int, ref_len: int) -> float:
    """BLEU by its definition: brevity penalty times the geometric mean of the four n-gram precisions."""
    penalty = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * penalty * math.prod(precisions) ** (1 / 4)


def test_bleu_on_english_words():
    # a b c d e / a b c d f: 4 of 5 unigrams, 3 of 4 bigrams, 2 of 3 trigrams, 1 of 2 four-grams match.
    assert corpus_bleu(["a b c d e"], ["a b c d f"], "en") == pytest.approx(bleu4([4 / 5, 3 / 4, 2 / 3, 1 / 2], 5, 5))


def test_bleu_on_chinese_characters_with_brevity_penalty():
    # 4 characters against 6: every n-gram matches, the penalty is exp(1 - 6/4).
    assert corpus_bleu(["皇上万福"], ["皇上万福金安"], "zh") == pytest.approx(100 * math.exp(-0.5))
    assert corpus_bleu(["皇上万福"], ["皇上万福金安"], "zh") == pytest.approx(bleu4([1, 1, 1, 1], 4, 6))


def test_bleu_smooths_an_order_without_matches():
    # a b c x / a b c y: no four-gram matches; exp smoothing counts it as 1 / (2^1 x 1 four-gram) = 1/2.
    assert corpus_bleu(["a b c x"], ["a b c y"], "en") == pytest.approx(bleu4([3 / 4, 2 / 3, 1 / 2, 1 / 2], 4, 4))


def test_corpus_bleu_sums_counts_over_replies_before_dividing():
    hypotheses, references = ["a b c d e", "x y"], ["a b c d f", "x y"]
    # unigrams 4+2 of 5+2, bigrams 3+1 of 4+1, trigrams 2+0 of 3+0, four-grams 1+0 of 2+0.
    expected = bleu4([6 / 7, 4 / 5, 2 / 3, 1 / 2], 7, 7)
    assert corpus_bleu(hypotheses, references, "en") == pytest.approx(expected)


def test_sentence_bleu_of_an_exact_reply_is_100():
    assert sentence_bleu("皇上万福金安。", "皇上万福金安。", "zh") == pytest.approx(100)
    assert sentence_bleu("I am Zhen Huan.", "I am Zhen Huan.", "en") == pytest.approx(100)


def test_rouge_l_on_chinese_characters():
    # LCS 4 characters: precision 4/4, recall 4/6, F1 = 2PR / (P + R) = 0.8.
    assert rouge_l("皇上万福", "皇上万福金安", "zh") == pytest.approx(80)


def test_rouge_l_on_english_words():
    # the cat sat on the mat / the cat is on the mat: LCS "the cat on the mat" = 5 of 6 words each side.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat", "en") == pytest.approx(100 * 5 / 6)


def test_rouge_l_of_a_reply_with_nothing_in_common_is_0():
    assert rouge_l("晴。", "家父是大理寺少卿甄远道", "zh") == 0


def test_language_follows_the_script_of_the_reference():
    assert language_of("家父是大理寺少卿甄远道。") == "zh"
    assert language_of("I am 甄嬛.") == "zh"
    assert language_of("I am Zhen Huan.") == "en"


def test_scores_are_grouped_by_language():
    scores = score_replies(["皇上万福", "the cat sat on the mat"], ["皇上万福金安", "the cat is on the mat"])
    assert scores["zh"] == pytest.approx({"records": 1, "bleu4": 100 * math.exp(-0.5), "rouge_l": 80})
    assert scores["en"]["records"] == 1 and scores["en"]["rouge_l"] == pytest.approx(100 * 5 / 6)
    assert score_replies(["晴。"], ["晴。"]).keys() == {"zh"}


def test_reply_scores_name_the_language():
    assert reply_scores("皇上万福", "皇上万福金安") | {"bleu4": 0} == {"language": "zh", "bleu4": 0, "rouge_l": 80}


def test_stop_rate_counts_replies_that_end_on_a_stop_token(qwen_tokenizer):
    im_end, endoftext = QwenFormat(qwen_tokenizer).stop_token_ids
    generated = [
        [11, 12, im_end],  # ended its turn
        [11, 12, 13],  # ran to the token limit
        [endoftext],  # end of text also stops
        [],  # nothing generated
        [im_end, 11],  # a stop token that is not the last one did not end generation
    ]
    assert [stopped(ids, {im_end, endoftext}) for ids in generated] == [True, False, True, False, False]
    assert stop_rate(generated, [im_end, endoftext]) == pytest.approx(2 / 5)
    assert stop_rate([], [im_end]) == 0.0
