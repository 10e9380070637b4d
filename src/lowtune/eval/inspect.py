"""`lowtune data inspect`: what training will see, before any weight is loaded.

Records read per file (for a mixture: how many were drawn of how many), those held out, those cut by max_length and
those dropped because the cut left nothing to train on, exact duplicates, token-length statistics with a histogram,
and a few records rendered with their trained spans marked (the label audit: exactly what the loss sees, end-of-turn
token included).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lowtune.config import RunConfig
from lowtune.data.encoded import EncodedSet, Records, encode_conversations
from lowtune.data.read import Example, check_files_exist
from lowtune.data.run_data import first_examples, read_run_files, split_run_records
from lowtune.data.templates import IGNORE_INDEX, ChatFormat, build_chat_format
from lowtune.eval.plots import plot_length_histogram
from lowtune.model.load import load_tokenizer

REPORT_FILE_NAME = "data_report.json"
HISTOGRAM_FILE_NAME = "length_histogram.png"
TEXT_FILE_NAME = "data_inspect.txt"
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"
REPLACEMENT = "\ufffd"  # what a piece of a multi-byte character decodes to
CHARACTER_TOKENS = 4  # a UTF-8 character spans at most 4 bytes, so at most 4 byte-level tokens


@dataclass
class LabelledSample:
    """One record as the model sees it: consecutive pieces of text, each trained or not."""

    source: str
    pieces: list[tuple[str, bool]]
    cut_tokens: int  # tokens beyond max_length

    def plain(self) -> str:
        text = "".join(f"{TRAINED_OPEN}{t}{TRAINED_CLOSE}" if trained else t for t, trained in self.pieces)
        return text + self._cut_note()

    def markup(self) -> str:
        text = "".join(f"[bold green]{escape(t)}[/]" if trained else escape(t) for t, trained in self.pieces)
        return text + escape(self._cut_note())

    def _cut_note(self) -> str:
        return f" ✂ [{self.cut_tokens} tokens cut by max_length]" if self.cut_tokens else ""


@dataclass
class DataReport:
    """Statistics of a data set encoded with a chat format; lengths are counted before truncation."""

    files: dict[str, int]
    max_length: int
    lengths: list[int]
    trained_tokens: int
    truncated: list[str]  # sources of records longer than max_length
    dropped: list[str]  # sources of records the cut left with no trained token (not trained on)
    duplicates: list[tuple[str, str]]  # (source, source of its first copy)
    samples: list[LabelledSample] = field(default_factory=list)
    held_out: int = 0
    mixture: list[dict] = field(default_factory=list)  # Drawn.to_dict() of each file, when any file is drawn

    @property
    def records(self) -> int:
        return sum(self.files.values())

    def length_stats(self) -> dict[str, float]:
        lengths = np.asarray(self.lengths)
        return {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
            "mean": round(float(lengths.mean()), 1),
        }

    def summary(self) -> list[tuple[str, str]]:
        """(what, value) lines shared by the terminal table, the text file and the run report."""
        stats = ", ".join(f"{key} {value:g}" for key, value in self.length_stats().items())
        lines = [("records read", f"{self.records}")]
        if self.mixture:
            lines += [(f"  {_short(d['file'])}", _drawn(d)) for d in self.mixture]
        else:
            lines += [(f"  {_short(name)}", f"{count}") for name, count in self.files.items()]
        duplicates = [f"{_short(copy)} = {_short(first)}" for copy, first in self.duplicates]
        lines += [
            ("held out for evaluation", f"{self.held_out}"),
            (f"cut by max_length={self.max_length}", _count([_short(s) for s in self.truncated])),
            ("dropped: the cut left no trained token", _count([_short(s) for s in self.dropped])),
            ("exact duplicates", _count(duplicates)),
            ("tokens per record", stats),
            ("trained tokens (after the cut)", f"{self.trained_tokens}"),
        ]
        return lines

    def to_dict(self) -> dict:
        return asdict(self) | {"records": self.records, "length_stats": self.length_stats()}


def inspect_data(config: RunConfig, sample_count: int = 3) -> DataReport:
    """Reads and validates the run's data files, encodes them with its chat format; loads only the tokenizer.

    Validation errors stop here with a UserError, as they would stop training.
    """
    data = config.data
    check_files_exist(data.files + data.eval_files)
    tokenizer = load_tokenizer(config.model)
    chat_format = build_chat_format(data.template, tokenizer, data.system)
    drawn = read_run_files(config, data.files, chat_format)
    _, held_out, evaluation = split_run_records(config, drawn, chat_format)  # the split training makes
    report = analyse_records(drawn.records, chat_format, data.max_length, sample_count, held_out)
    report.mixture = drawn.mixture.to_dict() if drawn.mixture.is_drawn else []
    for each in (drawn, evaluation):
        if each is not None:
            each.save_to_cache()
    return report


def default_folder(config: RunConfig) -> Path:
    """Where `data inspect` writes: beside the run's output_dir, not in it (training refuses a folder with files)."""
    return Path(f"{config.output_dir.rstrip('/')}-data")


def analyse_examples(
    examples: Sequence[Example],
    chat_format: ChatFormat,
    max_length: int,
    sample_count: int = 3,
    held_out: Sequence[Example] = (),
) -> DataReport:
    """The statistics of `inspect_data` for examples already read.

    `held_out`: the records kept for evaluation (among `examples`, or from eval files): their tokens are not counted
    as trained, so that the trained tokens are those training logs and trains on."""
    builder = encode_conversations(((e.messages, 0) for e in examples), chat_format, max_length)
    encoded = builder.build(names=[example.source for example in examples])
    encoded.origin = list(examples)  # the samples' records, to encode past the cut
    records = Records.whole([encoded])
    evaluated = {example.source for example in held_out}
    among = np.array([example.source in evaluated for example in examples], dtype=np.bool_)
    report = analyse_records(records, chat_format, max_length, sample_count, records.where(among))
    report.held_out = len(held_out)
    return report


def analyse_records(
    records: Records,
    chat_format: ChatFormat,
    max_length: int,
    sample_count: int = 3,
    held_out: Records | None = None,
) -> DataReport:
    """The statistics of `inspect_data` for records already encoded (training calls this for its report).

    `held_out`: the records kept for evaluation (some of `records`, or those of eval files): the tokens of those
    among `records` are not counted as trained, so that the trained tokens are those training logs and trains on.
    """
    lengths = records.per_record("full_lengths")
    too_long = lengths > max_length
    # The same rule as training_data: cut at max_length, drop what has no trained token left.
    trained = records.per_record("trained_counts")
    evaluated = _among(records, held_out) if held_out is not None else np.zeros(len(records), dtype=np.bool_)
    report = DataReport(
        files=_per_file(records),
        max_length=max_length,
        lengths=lengths.tolist(),
        trained_tokens=int(trained[~evaluated].sum()),
        truncated=records.sources(too_long),
        dropped=records.sources(trained == 0),
        duplicates=_duplicates(records),
        held_out=len(held_out) if held_out is not None else 0,
    )
    chosen = _sample_indices(too_long, sample_count)
    picked = list(records.take(chosen))
    report.samples = [_labelled(each, index, chat_format, max_length) for each, index in picked]
    return report


def text_histogram(lengths: Sequence[int], max_length: int, bins: int = 12, width: int = 40) -> str:
    """A histogram in text, one line a bin; bins reaching past max_length are marked ✂."""
    counts, edges = np.histogram(lengths, bins=bins)
    peak = max(counts.max(), 1)
    lines = []
    for count, low, high in zip(counts, edges[:-1], edges[1:], strict=True):
        bar = "█" * round(width * count / peak)
        mark = " ✂" if high > max_length else ""
        lines.append(f"{low:>7.0f} - {high:<7.0f} {bar:<{width}} {count}{mark}")
    return "\n".join(lines)


def save_inspection(report: DataReport, folder: str | Path) -> list[Path]:
    """Writes data_report.json, length_histogram.png and data_inspect.txt (summary, histogram, samples)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / REPORT_FILE_NAME
    json_path.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
    png_path = plot_length_histogram(report.lengths, report.max_length, folder / HISTOGRAM_FILE_NAME)
    text = [f"{what}: {value}" for what, value in report.summary()]
    text += ["", "tokens per record:", text_histogram(report.lengths, report.max_length), ""]
    text += [f"trained spans are in {TRAINED_OPEN}{TRAINED_CLOSE}", ""]
    text += [f"--- {sample.source}\n{sample.plain()}\n" for sample in report.samples]
    text_path = folder / TEXT_FILE_NAME
    text_path.write_text("\n".join(text), encoding="utf-8")
    return [json_path, png_path, text_path]


def print_inspection(report: DataReport, console: Console) -> None:
    """The summary table, the text histogram and the samples with trained spans in green."""
    table = Table(title="Data", show_header=False)
    for what, value in report.summary():
        table.add_row(what, escape(value))
    console.print(table)
    console.print(text_histogram(report.lengths, report.max_length), markup=False, highlight=False)
    for sample in report.samples:
        console.rule(f"[dim]{escape(sample.source)}[/] (trained in [bold green]green[/])")
        console.print(sample.markup(), highlight=False)


def _per_file(records: Records) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for each, indices in records.parts:
        if each.names is None:
            counts[each.file] += len(indices)
        else:
            counts.update(each.names[index].rsplit(":", 1)[0] for index in indices.tolist())
    return dict(counts)


def _duplicates(records: Records) -> list[tuple[str, str]]:
    """(source, source of its first copy) of each exact copy of an earlier record (by the messages' digests)."""
    digests = records.per_record("digests")
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    originals = first[inverse]  # (records,) the position of each record's first copy
    copies = np.flatnonzero(originals != np.arange(len(digests)))
    if not len(copies):
        return []
    sources = records.take(copies).sources()
    kept, back = np.unique(originals[copies], return_inverse=True)
    first_sources = records.take(kept).sources()
    return [(source, first_sources[b]) for source, b in zip(sources, back.tolist(), strict=True)]


def _sample_indices(too_long: np.ndarray, count: int) -> list[int]:
    """The first records, one of them a truncated record when there is one: the cut is what needs auditing."""
    chosen = list(range(min(count, len(too_long))))
    truncated = np.flatnonzero(too_long)
    if len(truncated) and chosen and not too_long[chosen].any():
        chosen[-1] = int(truncated[0])
    return sorted(chosen)


def _labelled(encoded: EncodedSet, index: int, chat_format: ChatFormat, max_length: int) -> LabelledSample:
    row = encoded.row(index)
    tokens = list(zip(row["input_ids"], row["labels"], strict=True))
    following = row["input_ids"] + _past_cut(encoded, index, chat_format, max_length)
    pieces = []
    done = 0
    for trained, run in groupby(tokens, key=lambda pair: pair[1] != IGNORE_INDEX):
        ids = [token for token, _ in run]
        done += len(ids)
        pieces.append((_decoded(chat_format, ids, following[done : done + CHARACTER_TOKENS]), trained))
    return LabelledSample(encoded.source(index), pieces, max(0, int(encoded.full_lengths[index]) - max_length))


def _past_cut(encoded: EncodedSet, index: int, chat_format: ChatFormat, max_length: int) -> list[int]:
    """The first tokens a truncated record has past max_length (none for a whole one): the encoded set keeps only
    those before the cut, so the record is read again (by line, or from the examples given) and encoded."""
    if int(encoded.full_lengths[index]) <= max_length:
        return []
    (example,) = first_examples(Records([(encoded, np.array([index], dtype=np.int64))]), 1)
    input_ids, _ = chat_format.encode(example.messages)
    return input_ids[max_length : max_length + CHARACTER_TOKENS]


def _among(records: Records, others: Records) -> np.ndarray:
    """(records,) bool: the record is one of `others` (the same encoded set, the same index)."""
    flags = []
    for each, indices in records.parts:
        theirs = [chosen for other, chosen in others.parts if other is each]
        flags.append(np.isin(indices, np.concatenate(theirs)) if theirs else np.zeros(len(indices), dtype=np.bool_))
    return np.concatenate(flags) if flags else np.zeros(0, dtype=np.bool_)


def _drawn(drawn: dict) -> str:
    """ "2000 of 10000 (weight 0.3)": a file's line of the summary in a mixture."""
    how = f" (weight {drawn['weight']:g})" if drawn["weight"] is not None else ""
    how += f" (samples {drawn['samples']})" if drawn["samples"] is not None else ""
    return f"{drawn['drawn']} of {drawn['records']}{how}"


def _decoded(chat_format: ChatFormat, ids: list[int], following: list[int]) -> str:
    """The text of `ids` without a character that the cut at max_length splits: byte-level tokens can end inside a
    multi-byte character, which decodes as U+FFFD. What `ids` decode to alike with and without the `following`
    tokens is whole."""
    text = chat_format.tokenizer.decode(ids, skip_special_tokens=False)
    if not following:
        return text
    longer = chat_format.tokenizer.decode(ids + following, skip_special_tokens=False)
    whole = len(os.path.commonprefix([text, longer]))
    return text[:whole] if text.endswith(REPLACEMENT) else text


def _count(items: Sequence[str]) -> str:
    return f"{len(items)} (first: {items[0]})" if items else "0"


def _short(source: str) -> str:
    """file:line without the folders: long paths drown the summary (data_report.json keeps them whole)."""
    return Path(source).name
