"""One DPO race: lowtune's DPO against TRL's DPOTrainer + peft (the plain recipe), same model, pairs and batch.

    PYTHONPATH=src python bench/dpo_race.py --model qwen-7b --steps 10 --warmup 3                    # on the GPU
    PYTHONPATH=src python bench/dpo_race.py --steps 3 --warmup 1 --pairs 32 --batch 4               # CPU, tiny model

`--model qwen-7b` writes random weights of Qwen-7B's shape (lowtune.bench.model) with the Qwen tokenizer to a
temporary folder first; `--model FOLDER` races a model of your own.

Both sides: 4-bit NF4 + double quantization (--quantization none for bf16/fp32), LoRA r 8, alpha 32 on all seven
projections, beta 0.1, lr 1e-4, the same preference pairs built from the bundled Chat-甄嬛 data (chosen: a record's
in-persona reply; rejected: the next record's reply), `--batch` pairs per optimizer step. TRL runs its defaults
(precompute_ref_log_probs off: the reference is the model with the adapter disabled, a second forward each step).
Each side runs in its own process and prints one JSON line (also appended to bench/results.jsonl): tok/s is the real
tokens (chosen + rejected, prompts included, as lowtune encodes them with the model's chat template) of a step's pairs,
averaged over the set, divided by the mean seconds of the steps after `--warmup`; peak is
torch.cuda.max_memory_allocated (on the CPU: the process's peak resident memory).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

RESULTS = Path(__file__).with_name("results.jsonl")
HUANHUAN = Path(__file__).parents[1] / "src" / "lowtune" / "data" / "resources" / "huanhuan.json"


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step (the device synchronised at each end)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.ends:
            self.ends.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def mean_step(self, warmup: int) -> float:
        steps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][warmup:]
        return sum(steps) / len(steps)


def build_pairs(count: int, folder: Path) -> Path:
    records = json.loads(HUANHUAN.read_text(encoding="utf-8"))[: count + 1]
    pairs = [
        {"prompt": (r["instruction"] + "\n" + r["input"]).strip(), "chosen": r["output"], "rejected": n["output"]}
        for r, n in zip(records, records[1:], strict=False)
        if r["output"] != n["output"]
    ]
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs) + "\n", encoding="utf-8")
    return path


def random_model(folder: Path, name: str | None) -> Path:
    """Random weights with the real Qwen tokenizer: Qwen-7B's shape for `qwen-7b` (built in bf16 on the GPU), else a
    small Qwen2 (hidden 256, 2 layers, Qwen's vocabulary) for a CPU check."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lowtune import internals
    from lowtune.bench.model import qwen_7b_config
    from lowtune.model.qwen_tokenizer import build_qwen_tokenizer

    torch.manual_seed(0)
    if name == "qwen-7b":
        with torch.device("cuda"):
            model = internals.model_from_config(Qwen2ForCausalLM, qwen_7b_config(), torch.bfloat16)
    else:
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
        model = Qwen2ForCausalLM(
            Qwen2Config(vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=False, **shape)
        )
    model.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the sides run in processes of their own, each with the whole GPU
    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    return folder


def lowtune_config(args: argparse.Namespace, pairs: Path, output: Path):
    from lowtune.config import load_config

    quantization = [f"model.quantization={args.quantization}"]
    if args.quantization == "4bit":
        quantization += ["model.quant_type=nf4", "model.double_quant=true"]
    return load_config(
        None,
        [
            f"model.path={args.model}",
            *quantization,
            f"data.files=[{pairs}]",
            "data.template=tokenizer",
            f"output_dir={output}",
            "lora.r=8",
            "lora.alpha=32",
            "lora.dropout=0.0",
            "train.method=dpo",
            "train.beta=0.1",
            f"train.batch_size={args.batch}",
            f"train.max_steps={args.steps + args.warmup}",
            "train.learning_rate=1e-4",
            "train.save_steps=0",
            "train.logging_steps=1",
            f"train.gradient_checkpointing={args.checkpointing}",
            f"train.cuda_graphs={args.cuda_graphs}",
        ],
    )


def pair_tokens(args: argparse.Namespace, pairs: Path) -> float:
    """Mean real tokens of a pair (chosen + rejected sequences), as lowtune encodes them."""
    from lowtune.data.preference import encode_pairs, read_pairs
    from lowtune.data.templates import build_chat_format
    from lowtune.model.load import load_tokenizer

    config = lowtune_config(args, pairs, Path(tempfile.mkdtemp()))
    chat_format = build_chat_format("tokenizer", load_tokenizer(config.model))
    data = encode_pairs(read_pairs([str(pairs)], 0)[0], chat_format, config.data.max_length)
    return sum(data.lengths) / len(data.lengths)


def run_lowtune(args: argparse.Namespace, pairs: Path, timer: StepTimer) -> None:
    from lowtune.recipe import run

    run(lowtune_config(args, pairs, Path(tempfile.mkdtemp()) / "run"), callbacks=[timer])


def run_trl(args: argparse.Namespace, pairs: Path, timer: StepTimer) -> None:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    quantization = None
    if args.quantization == "4bit":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, quantization_config=quantization)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or "<|endoftext|>"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=str(pairs), split="train")
    dataset = dataset.map(  # TRL's conversational layout: the model's chat template renders it, as lowtune's does
        lambda r: {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
    )
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + args.warmup,
        learning_rate=1e-4,
        beta=0.1,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        max_length=1024,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    trainer.add_callback(timer)
    trainer.train()


def side(args: argparse.Namespace) -> None:
    pairs = Path(args.pairs_file)
    timer = StepTimer()
    (run_lowtune if args.side == "lowtune" else run_trl)(args, pairs, timer)
    step = timer.mean_step(args.warmup)
    tokens = pair_tokens(args, pairs) * args.batch
    on_gpu = torch.cuda.is_available()
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if on_gpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    result = {
        "bench": "dpo_race",
        "side": f"lowtune (checkpointing {args.checkpointing}, cuda_graphs {args.cuda_graphs})"
        if args.side == "lowtune"
        else "trl DPOTrainer + peft",
        "model": str(args.model),
        "quantization": args.quantization,
        "pairs_per_step": args.batch,
        "timed_steps": args.steps,
        "seconds_per_step": round(step, 3),
        "tok_s": round(tokens / step, 1),
        "peak_gib": round(peak, 2),
        "peak_kind": "cuda max_memory_allocated" if on_gpu else "peak RSS",
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }
    line = json.dumps(result, ensure_ascii=False)
    print(line, flush=True)
    with RESULTS.open("a", encoding="utf-8") as results:
        results.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model folder, or qwen-7b (random, on the GPU); empty: a tiny Qwen2 (CPU)")
    parser.add_argument(
        "--checkpointing",
        default="true",
        help="lowtune's train.gradient_checkpointing, comma-separated for one lowtune run each (TRL's default: on)",
    )
    parser.add_argument("--cuda-graphs", default="auto", help="lowtune's train.cuda_graphs (true: DPO steps too)")
    parser.add_argument("--quantization", default="4bit", choices=["4bit", "none"])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--side", choices=["lowtune", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args)
        return
    folder = Path(tempfile.mkdtemp())
    given = args.model and args.model != "qwen-7b"
    model = args.model if given else str(random_model(folder / "model", args.model))
    pairs = build_pairs(args.pairs, folder)
    first, *others = args.checkpointing.split(",")  # TRL right after the first: the pair of the race comes first
    sides = [("lowtune", first), ("trl", "true")] + [("lowtune", mode) for mode in others]
    failed = 0
    for name, checkpointing in sides:
        command = [sys.executable, __file__, "--side", name, "--pairs-file", str(pairs), "--model", model]
        command += ["--quantization", args.quantization, "--batch", str(args.batch), "--checkpointing", checkpointing]
        command += ["--cuda-graphs", args.cuda_graphs]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        failed += subprocess.run(command).returncode != 0  # the other sides still run
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
