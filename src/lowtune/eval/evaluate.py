"""`lowtune eval`: did fine-tuning change how the model answers? Loss, replies and their scores on held-out records.

For each held-out conversation: the eval loss of its trained tokens (from hidden states: no vocabulary-sized logits
are kept), a greedy reply to its last user turn in the run's chat format, BLEU-4 and ROUGE-L of that reply against
the recorded one, and whether the reply ended with the format's stop token (a model that never learned to stop runs
to the token limit). With `base`, the same for the base model (the adapter switched off) beside it. A DPO or ORPO
run, or a file of preference pairs, is evaluated on its pairs instead (`eval/preference.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from transformers import PreTrainedModel

from lowtune.config import RunConfig, load_run_config
from lowtune.data.encode import encode_examples
from lowtune.data.pack import PaddedCollator
from lowtune.data.read import Example, Message, read_examples
from lowtune.data.split import held_out_of_run, split_for_run
from lowtune.data.templates import ChatFormat, input_separator
from lowtune.eval.metrics import SCORING, reply_scores, score_replies, stop_rate, stopped
from lowtune.eval.preference import evaluates_pairs, formatted_pair_metrics, pair_results
from lowtune.infer.session import ChatModel, base_model_settings
from lowtune.train.loss import install_hidden_state_loss
from lowtune.train.validate import eval_loss

log = logging.getLogger(__name__)
RESULTS_FILE_NAME = "eval_results.json"
SAMPLES_FILE_NAME = "eval_samples.jsonl"


@dataclass(frozen=True)
class Generation:
    """A greedy reply: its new token ids (the stop token included, when it came), text, and whether it stopped."""

    ids: list[int]
    text: str
    stopped: bool


def evaluate_run(
    adapter_dir: str | Path,
    data: str | Path | None = None,
    limit: int | None = None,
    base: bool = False,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    model_path: str | None = None,
) -> dict[str, Any]:
    """Evaluates a run on its held-out records (a DPO or ORPO run: its held-out pairs); writes eval_results.json and
    eval_samples.jsonl into the run folder.

    Args:
        adapter_dir: a lowtune run folder or one of its checkpoints.
        data: a file of records to evaluate on instead of the run's own held-out records; preference pairs are
            evaluated as pairs (preference accuracy, rewards), whatever the run's method.
        limit: evaluate the first N records (pairs) only.
        base: also evaluate the base model (the adapter disabled), for comparison.
        max_new_tokens: the longest reply; one that reaches it has not stopped.
        batch_size: records (pairs) per forward pass and per generation batch.
        model_path: the base model folder, when it moved since training.

    Returns:
        The results written to eval_results.json.
    """
    folder = Path(adapter_dir)
    base_model_settings(folder)  # fails with a clear message if the folder is not a run
    config = load_run_config(folder)
    if evaluates_pairs(config, data):
        results, lines = pair_results(folder, config, data, limit, base, batch_size, model_path)
        _write_results(folder, results, lines)
        return results
    examples, described = held_out_examples(config, data)
    examples = examples[:limit] if limit else examples
    log.info("evaluating on %d records: %s", len(examples), described)
    chat_model = ChatModel.from_adapter(folder, model_path)
    install_hidden_state_loss(chat_model.model.get_base_model())
    evaluate = partial(_evaluate_model, chat_model, examples, config.data.max_length, max_new_tokens, batch_size)
    models = {"adapter": evaluate()}
    if base:
        with chat_model.model.disable_adapter():
            models["base"] = evaluate()
    results = {
        "adapter": str(folder),
        "data": described,
        "records": len(examples),
        "chat_format": chat_model.chat_format.name,
        "end_of_turn": chat_model.chat_format.end_of_turn,
        "max_new_tokens": max_new_tokens,
        "scoring": SCORING,
        "models": {name: metrics for name, (metrics, _) in models.items()},
    }
    _write_results(folder, results, _sample_lines(examples, {name: replies for name, (_, replies) in models.items()}))
    return results


def held_out_examples(config: RunConfig, data: str | Path | None = None) -> tuple[list[Example], str]:
    """The records to evaluate on and where they come from: `data` when given, else the run's eval_files, else the
    records its val_size held out (the same split training made: same files, val_size and seed)."""
    separator = input_separator(config.data.template)
    if data is not None:
        return read_examples([str(data)], "auto", separator), str(data)  # its own format, whatever training read

    def held_out() -> list[Example]:
        examples = read_examples(config.data.files, config.data.format, separator, config.train.seed)
        return split_for_run(config, examples)[1]

    return held_out_of_run(config, "records", held_out)


def prompt_and_reference(example: Example) -> tuple[list[Message], str]:
    """The conversation up to its last user turn (system and history included) and the last assistant reply."""
    return list(example.messages[:-1]), example.messages[-1].content


def generate(
    model: PreTrainedModel,
    chat_format: ChatFormat,
    conversations: Sequence[Sequence[Message]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[Generation]:
    """Greedy replies, in batches of similar prompt length, stopping at the format's stop tokens.

    Unlike `ChatModel.reply` this keeps the generated ids, which tell whether the model stopped on its own.
    """
    prompts = [chat_format.encode_prompt(messages) for messages in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop_ids = chat_format.stop_token_ids
    replies: dict[int, Generation] = {}
    was_training = model.training
    model.eval()  # no dropout: greedy replies are reproducible
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        new_ids = _generate_batch(model, chat_format, [prompts[i] for i in chunk], max_new_tokens)
        for index, ids in zip(chunk, new_ids, strict=True):
            text = chat_format.tokenizer.decode(ids, skip_special_tokens=True)
            replies[index] = Generation(ids, text, stopped(ids, stop_ids))
    model.train(was_training)
    return [replies[i] for i in range(len(prompts))]


def sample_generations(
    model: PreTrainedModel,
    chat_format: ChatFormat,
    examples: Sequence[Example],
    count: int = 3,
    max_new_tokens: int = 128,
) -> list[dict[str, Any]]:
    """A few replies beside their references, for the run report: {prompt, reference, response, stopped}."""
    chosen = list(examples[:count])
    pairs = [prompt_and_reference(example) for example in chosen]
    replies = generate(model, chat_format, [messages for messages, _ in pairs], max_new_tokens)
    return [
        {"prompt": messages[-1].content, "reference": reference, "response": reply.text, "stopped": reply.stopped}
        for (messages, reference), reply in zip(pairs, replies, strict=True)
    ]


def results_table(results: dict[str, Any]) -> Table:
    """The metrics of each evaluated model side by side, for the terminal."""
    models = results["models"]
    if "pairs" in results:
        title, caption, formatted = f"{results['pairs']} preference pairs", results["rewards"], formatted_pair_metrics
    else:
        title, caption, formatted = f"{results['records']} records", results["scoring"], _formatted
    table = Table(title=f"Evaluation on {title} ({results['data']})", caption=caption)
    columns = {name: formatted(metrics) for name, metrics in models.items()}
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for label in next(iter(columns.values())):
        table.add_row(label, *(column[label] for column in columns.values()))
    return table


def _evaluate_model(
    chat_model: ChatModel, examples: list[Example], max_length: int, max_new_tokens: int, batch_size: int
) -> tuple[dict[str, Any], list[Generation]]:
    chat_format = chat_model.chat_format
    rows = encode_examples(examples, chat_format, max_length).rows
    metrics = eval_loss(chat_model.model, rows, PaddedCollator(chat_format.tokenizer.pad_token_id), batch_size)
    pairs = [prompt_and_reference(example) for example in examples]
    replies = generate(chat_model.model, chat_format, [messages for messages, _ in pairs], max_new_tokens, batch_size)
    ids = [reply.ids for reply in replies]
    metrics |= {
        "stop_rate": stop_rate(ids, chat_format.stop_token_ids),
        "mean_new_tokens": sum(map(len, ids)) / len(ids),
    }
    metrics |= score_replies([reply.text for reply in replies], [reference for _, reference in pairs])
    return metrics, replies


@torch.inference_mode()
def _generate_batch(
    model: PreTrainedModel, chat_format: ChatFormat, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Left-padded greedy generation; each row's new ids are cut after its first stop token (padding follows it)."""
    pad_id = chat_format.tokenizer.pad_token_id
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    stop_ids = chat_format.stop_token_ids
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    new_rows = output[:, width:].tolist()
    return [_until_stop(row, stop_ids) for row in new_rows]


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[: position + 1]
    return ids


def _formatted(metrics: dict[str, Any]) -> dict[str, str]:
    rows = {
        "eval loss": f"{metrics['eval_loss']:.4f}",
        "perplexity": f"{metrics['perplexity']:.2f}",
        "stop rate": f"{metrics['stop_rate']:.0%}",
        "reply tokens (mean)": f"{metrics['mean_new_tokens']:.1f}",
    }
    for language, level in (("zh", "characters"), ("en", "words")):
        if language in metrics:
            scores = metrics[language]
            rows[f"BLEU-4 {language} ({level}, n={scores['records']})"] = f"{scores['bleu4']:.2f}"
            rows[f"ROUGE-L {language} ({level})"] = f"{scores['rouge_l']:.2f}"
    return rows


def _write_results(folder: Path, results: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    (folder / RESULTS_FILE_NAME).write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    lines = [json.dumps(line, ensure_ascii=False) for line in samples]
    (folder / SAMPLES_FILE_NAME).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _sample_lines(examples: Sequence[Example], replies: dict[str, list[Generation]]) -> list[dict[str, Any]]:
    """One line per record: its source, prompt and reference, and each model's reply with its scores."""
    lines = []
    for index, example in enumerate(examples):
        messages, reference = prompt_and_reference(example)
        line: dict[str, Any] = {"source": example.source, "prompt": messages[-1].content, "reference": reference}
        for name, generations in replies.items():
            reply = generations[index]
            line[name] = {"response": reply.text, "stopped": reply.stopped, "new_tokens": len(reply.ids)}
            line[name] |= reply_scores(reply.text, reference)
        lines.append(line)
    return lines
