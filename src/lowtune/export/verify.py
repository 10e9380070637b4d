"""How closely one chat model follows another: greedy agreement and KL of the next-token distributions.

The reference answers each prompt greedily; then both models read the same tokens (the prompt and that answer) and
every position where a next token was predicted is compared. Teacher-forced rather than free-running: two free-running
answers part at their first different token (one near tie) and every later token then counts against the candidate,
while here each position is scored on the same context, so the figure measures the models and not where they parted.

For `lowtune merge`, the reference is base + adapter as trained and the candidate the merged model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from rich.table import Table

from lowtune.data.read import Message
from lowtune.infer.session import ChatModel, GenerationSettings


@dataclass(frozen=True)
class Comparison:
    """A candidate measured against a reference along the reference's greedy answers.

    Attributes:
        prompts: conversations answered.
        positions: next-token predictions compared (every token of the answers, their stop token included).
        greedy_agreement: share of positions where the candidate's most likely token is the reference's.
        mean_kl: mean KL(reference || candidate) of the next-token distributions, in nats.
        max_kl: the largest KL at one position, in nats.
    """

    prompts: int
    positions: int
    greedy_agreement: float
    mean_kl: float
    max_kl: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Limits:
    """How far a candidate may stray from its reference and still pass.

    Attributes:
        max_kl: the highest mean KL(reference || candidate), in nats.
        min_agreement: the lowest greedy agreement.
    """

    max_kl: float
    min_agreement: float

    def crossed(self, comparison: Comparison) -> list[str]:
        """What the comparison exceeds, in words (empty when it passes)."""
        crossed = []
        if not comparison.mean_kl <= self.max_kl:  # written so that a NaN crosses too
            crossed.append(f"mean KL {comparison.mean_kl:.3g} nats is above {self.max_kl:g}")
        if not comparison.greedy_agreement >= self.min_agreement:
            crossed.append(f"greedy agreement {comparison.greedy_agreement:.1%} is below {self.min_agreement:.0%}")
        return crossed


def compare(
    reference: ChatModel, candidate: ChatModel, conversations: Sequence[Sequence[Message]], max_new_tokens: int = 32
) -> Comparison:
    """Measures `candidate` against `reference` on the reference's greedy answers to `conversations`.

    Both models must share the tokenizer; prompts are encoded with the reference's chat format.
    """
    agreeing, kls = 0, []
    for messages in conversations:
        prompt = reference.chat_format.encode_prompt(messages)
        answer = reference.generate_ids(prompt, GenerationSettings(max_new_tokens=max_new_tokens))
        ids = prompt + answer
        expected = _next_token_log_probs(reference, ids, len(answer))  # (answer, vocab)
        found = _next_token_log_probs(candidate, ids, len(answer))
        # KL(p || q) = sum_v p_v (log p_v - log q_v), one value per position.
        kls.append((expected.exp() * (expected - found)).sum(-1))
        # The reference's own pick in this same pass (not the generated token, which a cached pass can tip in a
        # near tie): a candidate that computes what the reference computes agrees exactly.
        agreeing += int((expected.argmax(-1) == found.argmax(-1)).sum())
    kl = torch.cat(kls)
    return Comparison(len(conversations), len(kl), agreeing / len(kl), float(kl.mean()), float(kl.max()))


def comparison_table(comparison: Comparison, limits: Limits, title: str) -> Table:
    """The figures beside their limits, for the terminal."""
    table = Table(title=title)
    for column in ("measure", "value", "limit"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row("greedy agreement", f"{comparison.greedy_agreement:.2%}", f">= {limits.min_agreement:.0%}")
    table.add_row("mean KL (nats)", f"{comparison.mean_kl:.3g}", f"<= {limits.max_kl:g}")
    table.add_row("max KL (nats)", f"{comparison.max_kl:.3g}", "")
    table.add_row("prompts / positions", f"{comparison.prompts} / {comparison.positions}", "")
    return table


@torch.inference_mode()
def _next_token_log_probs(chat_model: ChatModel, ids: list[int], count: int) -> torch.Tensor:
    """(count, vocab) log-probabilities of the tokens after ids[-count-1:-1] (those that predicted the last `count`
    tokens), in fp64: in fp32 the rounding of log-softmax over a large vocabulary leaves a KL of ~1e-8 that can come
    out negative."""
    model = chat_model.model
    tensor = torch.tensor([ids], device=model.device)
    # logits_to_keep: only these positions' vocabulary-sized logits are computed (the last one predicts past the end).
    logits = model(input_ids=tensor, logits_to_keep=count + 1).logits[0, :-1]
    return logits.double().log_softmax(-1).cpu()
