"""`lowtune serve` under concurrent clients (issue 15): completion tokens/s at 1, 4 and 16 clients, batched
(`--max-batch 16`) beside one request at a time (`--max-batch 1`), in the same run, on a CPU.

    python bench/serve_throughput.py [--model tiny|smollm2] [--requests 32] [--max-tokens 48]

Two adapters of one base are served (two short runs on the bundled data); every client sends its share of the same
`--requests` prompts (the bundled data's last instructions), greedy, alternating between the adapters, one after
another, through the official `openai` client against a real server on loopback. Appends one JSON line to
bench/serve_results.jsonl and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
import uvicorn
from transformers import Qwen2Config, Qwen2ForCausalLM

from lowtune.config import load_config
from lowtune.data.read import read_records, resolve_data_path
from lowtune.infer.batch import ModelPool
from lowtune.infer.serve import create_app
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


def measure(pool: ModelPool, max_batch: int, clients: int, prompts: list[str], max_tokens: int) -> dict[str, float]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(pool, None, max_batch), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none", max_retries=0)
    names = list(pool.served)

    def one_client(index: int) -> int:
        tokens = 0
        for number in range(index, len(prompts), clients):
            reply = client.chat.completions.create(
                model=names[number % len(names)],
                messages=[{"role": "user", "content": prompts[number]}],
                temperature=0,
                max_tokens=max_tokens,
            )
            tokens += reply.usage.completion_tokens
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as threads:
        tokens = sum(threads.map(one_client, range(clients)))
    seconds = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=60)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    pool = ModelPool.from_adapters(two_runs(args.model, Path(tempfile.mkdtemp())))
    records = [record for _, record in read_records(resolve_data_path("builtin:huanhuan"))]
    prompts = [record["instruction"] for record in records[-args.requests :]]
    measure(pool, 16, 4, prompts[:4], 4)  # warm-up: first calls allocate
    figures = {
        f"batch {batch}, {clients} clients": measure(pool, batch, clients, prompts, args.max_tokens)
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
