"""Large-file data path: records/s and peak RSS of reading, cold encoding and a cached start, on a synthetic file.

    PYTHONPATH=src python bench/data_stream.py [--records 1000000] [--keep DIR]

Writes a synthetic JSONL of alpaca records (in a temporary folder, or DIR), then runs each phase in a process of its
own, so that each peak RSS (VmHWM) is that phase's alone:
- read: every record read and validated into messages (no tokenizer);
- encode: read, validated and encoded with the Qwen tokenizer (read from a saved folder, as from a model's;
  `template: qwen`, max_length 1024) into the encoded set, its training rows cut, and the set written to an empty
  cache, as `lowtune train` does before loading weights;
- cached: the same in a fresh process, the set read back from the cache.
Appends one JSON line to bench/data_results.jsonl (date, CPU, load average before and after, figures) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("data_results.jsonl")
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "which",
    "or",
    "be",
    "are",
    "an",
    "this",
]


def write_records(path: Path, count: int) -> None:
    """`count` alpaca records of 10 to 40 words each side, seeded (about 200 bytes a record)."""
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as stream:
        for i in range(count):
            question = " ".join(rng.choices(WORDS, k=rng.randint(10, 40)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(10, 40)))
            record = {"instruction": f"{i}: {question}?", "input": "", "output": answer}
            stream.write(json.dumps(record) + "\n")


def phase_read(path: Path) -> dict:
    from lowtune.config import DataFile
    from lowtune.data.read import file_conversations

    problems: list = []
    _, conversations = file_conversations(DataFile(path=str(path)), "auto", "\n", problems)
    records = sum(1 for _ in conversations)
    assert not problems
    return {"records": records}


def phase_encode(path: Path) -> dict:
    """read_files + training_data, as `prepare` runs them (the cache decides whether it encodes)."""
    from lowtune.config import DataFile
    from lowtune.data.encode import training_data
    from lowtune.data.run_data import read_files
    from lowtune.data.templates import QwenFormat
    from lowtune.model.load import read_tokenizer

    chat_format = QwenFormat(read_tokenizer(path.with_name("tokenizer")))
    before_data = status_mb("VmRSS")
    started = time.perf_counter()
    drawn = read_files([DataFile(path=str(path))], "auto", "\n", chat_format, 1024, seed=0)
    data = training_data(drawn.records, 1024)
    lengths = data.lengths  # what resolve_run and the batch sampler take
    drawn.save_to_cache()
    return {
        "records": len(data.rows),
        "tokens": int(sum(lengths)),
        "encoded_mb": round(data.rows.nbytes() / 1e6, 1),
        "seconds_without_tokenizer_load": round(time.perf_counter() - started, 2),
        "rss_before_data_mb": before_data,  # Python, torch, transformers and the tokenizer
        "rss_after_mb": status_mb("VmRSS"),
    }


def status_mb(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak) of this process, in MB. Not ru_maxrss: after fork and exec, Linux reports the
    larger of the parent's RSS at the fork and the child's own."""
    status = Path("/proc/self/status").read_text()
    return round(int(status.split(f"{field}:")[1].split()[0]) / 1024)


def run_phase(name: str, path: Path, cache: Path) -> dict:
    """One phase in its own process: its figures, wall seconds and peak RSS."""
    command = [sys.executable, __file__, "--phase", name, "--file", str(path)]
    environment = os.environ | {"LOWTUNE_DATA_CACHE": str(cache)}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    seconds = time.perf_counter() - started
    return figures | {"seconds": round(seconds, 2), "records_per_s": round(figures["records"] / seconds)}


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {
        "cpu": fields.get("Model name", "?").strip(),
        "cores": os.cpu_count(),
        "flags": [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="folder for the file and the cache (default: a temporary one)")
    parser.add_argument("--phase", choices=["read", "encode"], help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        figures = (phase_read if args.phase == "read" else phase_encode)(args.file)
        print(json.dumps(figures | {"peak_rss_mb": status_mb("VmHWM")}))
        return
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        path, cache = folder / "synthetic.jsonl", folder / "cache"
        write_records(path, args.records)
        from lowtune.model.qwen_tokenizer import build_qwen_tokenizer  # not in the phases' processes

        build_qwen_tokenizer().save_pretrained(folder / "tokenizer")  # as a model folder holds it
        load_before = os.getloadavg()
        phases = {name: run_phase(kind, path, cache) for name, kind in [("read", "read"), ("encode", "encode")]}
        phases["cached"] = run_phase("encode", path, cache)
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
            "command": "PYTHONPATH=src python bench/data_stream.py " + " ".join(sys.argv[1:]),
            "file_mb": round(path.stat().st_size / 1e6, 1),
            "phases": phases,
        }
    with RESULTS.open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
