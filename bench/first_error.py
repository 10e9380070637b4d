"""How long a newcomer waits for `lowtune --help` and for an immediate user error, each a fresh process.

    python bench/first_error.py [--runs 5] [--results bench/first_error_results.jsonl]

Times, as subprocesses (`python -m lowtune ...`, wall clock from start to exit), `lowtune --help`, a config error
(an unknown key), "output_dir already holds a run" and a data-format error (a malformed JSONL line); prints the
median and the range of each and appends one JSON line with the CPU model. The target (issue 20): about a second,
2 s at most, on 2 CPU cores. tests/train/test_preflight.py checks the same cases import neither torch nor
transformers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lowtune.machine import read_cpu


def cases(folder: Path) -> dict[str, tuple[list[str], int]]:
    good = folder / "good.jsonl"
    good.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    bad = folder / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": 3\n', encoding="utf-8")
    typo = folder / "typo.yaml"
    typo.write_text("train:\n  max_stepz: 3\n", encoding="utf-8")
    held = folder / "held"
    held.mkdir(exist_ok=True)
    (held / "adapter_config.json").write_text("{}", encoding="utf-8")
    return {
        "lowtune --help": (["--help"], 0),
        "config error": (["train", str(typo)], 2),
        "output_dir already holds a run": (["train", "--data", str(good), "--output-dir", str(held)], 2),
        "data-format error": (["train", "--data", str(bad), "--output-dir", str(folder / "new")], 2),
    }


def seconds(arguments: list[str], expected: int, cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lowtune", *arguments], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != expected:
        raise SystemExit(
            f"lowtune {' '.join(arguments)}: exit code {done.returncode}, expected {expected}\n{done.stderr}"
        )
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="Runs of each case (the median is reported).")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "first_error_results.jsonl")
    args = parser.parse_args()
    cpu = read_cpu()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seconds(["--help"], 0, folder)  # one untimed run: the page cache holds the interpreter and the packages
        for name, (arguments, expected) in cases(folder).items():
            times = [seconds(arguments, expected, folder) for _ in range(args.runs)]
            figures[name] = {
                "median_s": round(statistics.median(times), 3),
                "min_s": round(min(times), 3),
                "max_s": round(max(times), 3),
            }
            spread = f"{min(times):.2f} - {max(times):.2f}, {args.runs} runs"
            print(f"{name:<32} median {statistics.median(times):.2f} s  ({spread})")
    record = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu.describe(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "runs": args.runs,
        "figures": figures,
    }
    with args.results.open("a", encoding="utf-8") as results:
        results.write(json.dumps(record) + "\n")
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
