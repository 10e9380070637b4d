"""`lowtune serve` under concurrent clients (issue 15): completion tokens/s at 1, 4 and 16 clients, batched
(`--max-batch 16`) beside one request at a time (`--max-batch 1`), in the same run, on a CPU.

    python bench/serve_throughput.py [--model tiny|smollm2] [--requests 32] [--lengths 48] [--baseline-src DIR]

Two adapters of one base are served (two short runs on the bundled data); every client sends its share of the same
`--requests` prompts (the bundled data's last instructions), greedy, alternating between the adapters, one after
another, through the official `openai` client against `lowtune serve` on loopback, in its own process (each
configuration a fresh server, warmed up by two requests first). `--lengths 8,88` gives the requests those
`max_tokens` in turn (replies of mixed lengths, where a static batch holds short replies behind long ones);
`--baseline-src` also runs every configuration with the server of another source tree (`git archive REV src`), in
the same run. Appends one JSON line to bench/serve_results.jsonl and prints the table (tokens/s, mean seconds a
request).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import openai
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from lowtune.config import load_config
from lowtune.data.read import read_records, resolve_data_path
from lowtune.infer.serve import DEFAULT_BATCH_WINDOW
from lowtune.model.qwen_tokenizer import build_qwen_tokenizer
from lowtune.recipe import run

REPO = Path(__file__).resolve().parents[1]
CLIENTS = (1, 4, 16)
BATCHES = (1, 16)
# The tests' tiny Qwen2 (tests/conftest.py): hidden 64, 2 layers, Qwen's vocabulary.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_base(folder: Path) -> Path:
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, tie_word_embeddings=False, **TINY)).save_pretrained(folder)
    build_qwen_tokenizer().save_pretrained(folder)
    return folder


def two_runs(model: str, folder: Path) -> dict[str, Path]:
    """Two adapters of one base: the main job's config cut to a few steps, with different seeds."""
    example = REPO / "examples" / "huanhuan-qlora.yaml"
    base = [] if model == "smollm2" else [f"model.path={tiny_base(folder / 'base')}"]
    common = base + ["train.max_steps=4", "data.val_size=0", "train.eval_steps=null", "train.save_steps=0"]
    return {
        name: run(load_config(example, [*common, f"train.seed={seed}", f"output_dir={folder / name}"]))
        for seed, name in enumerate(("huan", "hua"))
    }


def measure(
    adapters: dict[str, Path], max_batch: int, clients: int, prompts: list[str], lengths: list[int], src: Path
) -> dict:
    """`lowtune serve` (from the source tree `src`) in its own process, as a user starts it; the clients are threads
    of this one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    named = [f"--adapter={name}={folder}" for name, folder in adapters.items()]
    command = [sys.executable, "-m", "lowtune", "serve", *named, f"--port={port}", f"--max-batch={max_batch}"]
    environment = os.environ | {"PYTHONPATH": str(src)}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        _wait_until_up(client, server)
        one_client = partial(_one_client, client, list(adapters), prompts, clients, lengths)
        one_client(0, warm_up=True)
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as threads:
            answers = [answer for answered in threads.map(one_client, range(clients)) for answer in answered]
        seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=60)
    tokens = sum(tokens for tokens, _ in answers)
    latency = sum(seconds for _, seconds in answers) / len(answers)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds, "mean_latency": latency}


def _wait_until_up(client: openai.OpenAI, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.poll() is None:
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            time.sleep(0.2)
    raise RuntimeError(f"lowtune serve did not start (exit code {server.poll()})")


def _one_client(
    client: openai.OpenAI,
    names: list[str],
    prompts: list[str],
    clients: int,
    lengths: list[int],
    index: int,
    warm_up: bool = False,
) -> list[tuple[int, float]]:
    """This client's share of the prompts, one request after another: each one's completion tokens and seconds."""
    answers = []
    for number in range(index, 2 if warm_up else len(prompts), clients):
        asked = time.perf_counter()
        reply = client.chat.completions.create(
            model=names[number % len(names)],
            messages=[{"role": "user", "content": prompts[number]}],
            temperature=0,
            max_tokens=lengths[number % len(lengths)],
        )
        answers.append((reply.usage.completion_tokens, time.perf_counter() - asked))
    return answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--lengths", default="48", help="max_tokens of the requests, in turn (e.g. 8,88)")
    parser.add_argument("--baseline-src", type=Path, default=None, help="also serve from this source tree")
    args = parser.parse_args()
    lengths = [int(length) for length in args.lengths.split(",")]
    trees = {"": REPO / "src"} | ({"baseline ": args.baseline_src.resolve()} if args.baseline_src else {})
    adapters = two_runs(args.model, Path(tempfile.mkdtemp()))
    records = [record for _, record in read_records(resolve_data_path("builtin:huanhuan"))]
    prompts = [record["instruction"] for record in records[-args.requests :]]
    figures = {  # each configuration's trees one after the other, so that they see the same machine
        f"{tree}batch {batch}, {clients} clients": measure(adapters, batch, clients, prompts, lengths, src)
        for batch in BATCHES
        for clients in CLIENTS
        for tree, src in trees.items()
    }
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("Flags")), [])
    line = {
        "date": dt.date.today().isoformat(),
        "cpu": model_name,
        "cpu_flags": [flag for flag in flags if flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")],
        "threads": torch.get_num_threads(),
        "model": args.model,
        "requests": args.requests,
        "max_tokens": lengths,
        "baseline_src": str(args.baseline_src) if args.baseline_src else None,
        "batch_window_ms": DEFAULT_BATCH_WINDOW * 1000,
        "figures": figures,
    }
    one_at_a_time = figures["batch 1, 1 clients"]["tokens_per_second"]
    print(f"{line['date']}, {model_name} ({', '.join(line['cpu_flags'])}), {line['threads']} threads, {args.model}")
    print("server    max batch  clients  tokens  seconds  tokens/s  s a request  x one at a time")
    for tree in trees:
        for batch in BATCHES:
            for clients in CLIENTS:
                figure = figures[f"{tree}batch {batch}, {clients} clients"]
                ratio = figure["tokens_per_second"] / one_at_a_time
                row = f"{tree or 'this':<8}  {batch:>9}  {clients:>7}  {figure['tokens']:>6}  {figure['seconds']:>7.1f}"
                print(f"{row}  {figure['tokens_per_second']:>8.1f}  {figure['mean_latency']:>11.2f}  {ratio:>15.2f}x")
    with (REPO / "bench" / "serve_results.jsonl").open("a", encoding="utf-8") as file:
        file.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
