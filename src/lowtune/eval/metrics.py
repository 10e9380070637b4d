"""How close generated replies come to the references (BLEU-4, ROUGE-L), and how often the model stopped.

Scoring is left to the field's reference implementations, on one tokenization: sacrebleu's `zh` tokenizer (each
Chinese character a token, Latin words kept whole) for a reference with Chinese in it, its `13a` tokenizer (words and
punctuation) for any other. BLEU-4 is sacrebleu's corpus BLEU (case kept, `exp` smoothing: an n-gram order with no
match counts as 1 / (2^k x its n-gram count) instead of zeroing the score); ROUGE-L is Google's rouge-score F1 on the
same tokens (its own tokenizer drops every non-ASCII character, so Chinese would score nothing), averaged over
replies. All scores are on a 0-100 scale.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Literal

Language = Literal["zh", "en"]
SACREBLEU_TOKENIZERS: dict[Language, str] = {"zh": "zh", "en": "13a"}
SCORING = (
    "BLEU-4: sacrebleu corpus BLEU, smoothing exp; ROUGE-L: rouge-score F1, mean over replies; "
    "tokens: Chinese characters (sacrebleu zh) where the reference has Chinese, else words (sacrebleu 13a); 0-100"
)
_CHINESE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _bleu(language: Language, **options: object):
    # Imported on use: training imports this package for its loss and replies, and never scores.
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=SACREBLEU_TOKENIZERS[language], **options)


def language_of(text: str) -> Language:
    """zh when the text holds a Chinese character (any Latin words in it are still scored whole), else en."""
    return "zh" if _CHINESE.search(text) else "en"


class SacrebleuTokens:
    """sacrebleu's tokenizer behind the `tokenize` method rouge-score calls, so both metrics see the same tokens."""

    def __init__(self, language: Language):
        self._tokenizer = _bleu(language).tokenizer

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer(text).split()


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], language: Language) -> float:
    """Corpus BLEU-4 (0-100): n-gram matches and lengths summed over all replies before the ratio is taken."""
    return _bleu(language).corpus_score(list(hypotheses), [list(references)]).score


def sentence_bleu(hypothesis: str, reference: str, language: Language) -> float:
    """BLEU-4 of one reply (0-100); orders longer than the reply are left out (sacrebleu's effective order)."""
    bleu = _bleu(language, effective_order=True)
    return bleu.sentence_score(hypothesis, [reference]).score


def rouge_l(hypothesis: str, reference: str, language: Language) -> float:
    """ROUGE-L F1 (0-100) of one reply: the longest common token subsequence against both lengths."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], tokenizer=SacrebleuTokens(language))
    return 100 * scorer.score(reference, hypothesis)["rougeL"].fmeasure


def score_replies(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, dict[str, float]]:
    """Corpus BLEU-4 and mean ROUGE-L per language of the references: {"zh": {...}, "en": {...}} (those present)."""
    scores: dict[str, dict[str, float]] = {}
    for language in SACREBLEU_TOKENIZERS:
        pairs = [(h, r) for h, r in zip(hypotheses, references, strict=True) if language_of(r) == language]
        if not pairs:
            continue
        hyps, refs = zip(*pairs, strict=True)
        scores[language] = {
            "records": len(pairs),
            "bleu4": corpus_bleu(hyps, refs, language),
            "rouge_l": sum(rouge_l(h, r, language) for h, r in pairs) / len(pairs),
        }
    return scores


def reply_scores(hypothesis: str, reference: str) -> dict[str, float | str]:
    """One reply's language, sentence BLEU-4 and ROUGE-L, for the per-sample file."""
    language = language_of(reference)
    return {
        "language": language,
        "bleu4": sentence_bleu(hypothesis, reference, language),
        "rouge_l": rouge_l(hypothesis, reference, language),
    }


def stopped(new_ids: Sequence[int], stop_ids: Collection[int]) -> bool:
    """Generation ended on one of the format's stop tokens (end of turn or end of text), not at the token limit."""
    return bool(new_ids) and new_ids[-1] in stop_ids


def stop_rate(generated: Sequence[Sequence[int]], stop_ids: Collection[int]) -> float:
    """Share of replies (their generated token ids) that stopped on their own; a model that never learned to end
    its turn scores 0."""
    if not generated:
        return 0.0
    return sum(stopped(ids, stop_ids) for ids in generated) / len(generated)
