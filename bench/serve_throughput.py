"""`lowtune serve` under concurrent clients (issue 15): completion tokens/s at 1, 4 and 16 clients, batched
(`--max-batch 16`) beside one request at a time (`--max-batch 1`), in the same run, on a CPU.

    python bench/serve_throughput.py [--model tiny|smollm2] [--requests 32] [--max-tokens 48]

Two adapters of one base are served (two short runs on the bundled data); every client sends its share of the same
`--requests` prompts (the bundled data's last instructions), greedy, alternating between the adapters, one after
another, through the official `openai` client against `lowtune serve` on loopback, in its own process (each
configuration a fresh server, warmed up by two requests first). Appends one JSON line to
bench/serve_results.jsonl and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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


def measure(adapters: dict[str, Path], max_batch: int, clients: int, prompts: list[str], max_tokens: int) -> dict:
    """`lowtune serve` in its own process, as a user starts it; the clients are threads of this one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    named = [f"--adapter={name}={folder}" for name, folder in adapters.items()]
    command = [sys.executable, "-m", "lowtune", "serve", *named, f"--port={port}", f"--max-batch={max_batch}"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        _wait_until_up(client, server)
        one_client = partial(_one_client, client, list(adapters), prompts, clients, max_tokens)
        one_client(0, warm_up=True)
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as threads:
            tokens = sum(threads.map(one_client, range(clients)))
        seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


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
    max_tokens: int,
    index: int,
    warm_up: bool = False,
) -> int:
    """This client's share of the prompts, one request after another; the completion tokens it got."""
    tokens = 0
    for number in range(index, 2 if warm_up else len(prompts), clients):
        reply = client.chat.completions.create(
            model=names[number % len(names)],
            messages=[{"role": "user", "content": prompts[number]}],
            temperature=0,
            max_tokens=max_tokens,
        )
        tokens += reply.usage.completion_tokens
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    adapters = two_runs(args.model, Path(tempfile.mkdtemp()))
    records = [record for _, record in read_records(resolve_data_path("builtin:huanhuan"))]
    prompts = [record["instruction"] for record in records[-args.requests :]]
    figures = {
        f"batch {batch}, {clients} clients": measure(adapters, batch, clients, prompts, args.max_tokens)
        for batch in BATCHES
        for clients in CLIENTS
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
        "max_tokens": args.max_tokens,
        "batch_window_ms": DEFAULT_BATCH_WINDOW * 1000,
        "figures": figures,
    }
    one_at_a_time = figures["batch 1, 1 clients"]["tokens_per_second"]
    print(f"{line['date']}, {model_name} ({', '.join(line['cpu_flags'])}), {line['threads']} threads, {args.model}")
    print("max batch  clients  tokens  seconds  tokens/s  x one at a time")
    for batch in BATCHES:
        for clients in CLIENTS:
            figure = figures[f"batch {batch}, {clients} clients"]
            ratio = figure["tokens_per_second"] / one_at_a_time
            row = f"{batch:>9}  {clients:>7}  {figure['tokens']:>6}  {figure['seconds']:>7.1f}"
            print(f"{row}  {figure['tokens_per_second']:>8.1f}  {ratio:>15.2f}x")
    with (REPO / "bench" / "serve_results.jsonl").open("a", encoding="utf-8") as file:
        file.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
