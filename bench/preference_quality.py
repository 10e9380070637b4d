"""DPO on top of the default SFT adapter (issue 18): held-out preference accuracy, and whether the persona holds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/preference_quality.py [--pairs 200] [--sft-steps 40] [--dpo-steps 30]

(OMP_NUM_THREADS=1 on a loaded 2-core machine: generation with 2 threads there ran ~10x slower; bench/NOTES.md.)

On the embedded SmolLM2-135M-Instruct (4-bit, as examples/huanhuan-qlora.yaml trains it) and the bundled Chat-甄嬛:
1. pairs: chosen = a record's in-persona reply, rejected = the base model's own greedy reply to the same prompt (the
   same system prompt and chat format; lowtune's batched generation, at most --reply-tokens new tokens; the base
   unquantized, for speed). The held-out
   pairs come from the records the SFT run holds out (their prompts are in no training set), the others from its
   training records;
2. the SFT adapter: examples/huanhuan-qlora.yaml, --sft-steps steps;
3. DPO on it: examples/huanhuan-dpo.yaml (train.init_adapter = the SFT run), --dpo-steps steps;
4. `lowtune eval` (its Python API, evaluate_run): the held-out pairs under the SFT adapter (DPO rewards against its
   start, the base) and under SFT+DPO (against its start, the SFT adapter: the target, at least 90% accuracy); the
   eval loss, BLEU-4 and ROUGE-L of both on the first --persona-records of the SFT run's held-out records (the
   persona: not much worse after DPO).
Each stage's output stays in --work: a rerun skips the stages already done. Prints the figures and appends one JSON
line to --results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

from lowtune.config import load_config
from lowtune.data.read import read_examples
from lowtune.data.split import split_for_run
from lowtune.data.templates import build_chat_format, input_separator
from lowtune.eval.evaluate import evaluate_run, generate, held_out_examples, prompt_and_reference
from lowtune.machine import read_cpu
from lowtune.recipe import load_model, run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HELD_OUT_SHARE = 0.15


def turns(messages) -> list[dict[str, str]]:
    return [{"role": message.role, "content": message.content} for message in messages]


def build_pairs(sft_config, work: Path, count: int, reply_tokens: int, batch: int) -> tuple[Path, Path, Path]:
    """train_pairs.jsonl, held_pairs.jsonl (from the SFT run's held-out records) and sft_held_out.jsonl."""
    files = [work / name for name in ("train_pairs.jsonl", "held_pairs.jsonl", "sft_held_out.jsonl")]
    if all(file.is_file() for file in files):
        return tuple(files)
    examples = read_examples(sft_config.data.files, "auto", input_separator(sft_config.data.template))
    trained, held_out = split_for_run(sft_config, examples)
    assert held_out == held_out_examples(sft_config)[0]  # what `lowtune eval` of the SFT run evaluates on
    held_count = round(count * HELD_OUT_SHARE)
    chosen = {"train": trained[: count - held_count], "held": held_out[:held_count]}
    # The base unquantized (fp32 on a CPU): 4-bit generation through bitsandbytes on 2 CPU cores had not finished 170
    # replies in 12 minutes. The replies are the base model's all the same; the runs train on the 4-bit base.
    model, tokenizer = load_model()
    chat_format = build_chat_format(sft_config.data.template, tokenizer, sft_config.data.system)
    started = time.time()
    for name, part in chosen.items():
        prompts = [prompt_and_reference(example) for example in part]
        replies = generate(model, chat_format, [messages for messages, _ in prompts], reply_tokens, batch)
        pairs = [
            {"messages": turns(messages), "chosen": reference, "rejected": reply.text}
            for (messages, reference), reply in zip(prompts, replies, strict=True)
            if reply.text.strip() and reply.text != reference
        ]
        target = files[0] if name == "train" else files[1]
        target.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        print(f"{name}: {len(pairs)} pairs of {len(part)} prompts ({len(part) - len(pairs)} dropped: same or empty)")
    print(f"base replies generated in {time.time() - started:.0f} s")
    lines = [json.dumps({"messages": turns(example.messages)}, ensure_ascii=False) + "\n" for example in held_out]
    files[2].write_text("".join(lines), encoding="utf-8")
    return tuple(files)


def train_once(config, label: str) -> tuple[Path, float | None]:
    output = Path(config.output_dir)
    if (output / "adapter_model.safetensors").is_file():
        return output, None
    started = time.time()
    run(config, overwrite=True)
    seconds = time.time() - started
    print(f"{label}: trained in {seconds:.0f} s")
    return output, seconds


def pair_figures(results: dict) -> dict:
    metrics = results["models"]["adapter"]
    return {"pairs": results["pairs"], "rewards": results["rewards"]} | {
        key: round(metrics[key], 4) for key in ("accuracy", "reward_margin", "rewards_chosen", "rewards_rejected")
    }


def persona_figures(results: dict) -> dict:
    metrics = results["models"]["adapter"]
    zh = metrics.get("zh", {})
    return {
        "records": results["records"],
        "eval_loss": round(metrics["eval_loss"], 4),
        "bleu4_zh": round(zh.get("bleu4", float("nan")), 2),
        "rouge_l_zh": round(zh.get("rouge_l", float("nan")), 2),
        "stop_rate": round(metrics["stop_rate"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200, help="Pairs built (15%% held out).")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--dpo-steps", type=int, default=30)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--reply-tokens", type=int, default=64, help="New tokens of a base reply, and of eval's.")
    parser.add_argument("--persona-records", type=int, default=50, help="SFT held-out records of the persona check.")
    parser.add_argument("--batch", type=int, default=16, help="Prompts per generation batch, records per forward.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowtune-preference-bench"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "preference_results.jsonl")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    began = time.time()
    sft_config = load_config(
        EXAMPLES / "huanhuan-qlora.yaml", [f"train.max_steps={args.sft_steps}", f"output_dir={args.work / 'sft'}"]
    )
    pair_files = build_pairs(sft_config, args.work, args.pairs, args.reply_tokens, args.batch)
    train_pairs, held_pairs, sft_held_out = pair_files
    sft, sft_seconds = train_once(sft_config, "SFT")
    dpo_config = load_config(
        EXAMPLES / "huanhuan-dpo.yaml",
        [
            f"data.files=[{train_pairs}]",
            f"data.eval_files=[{held_pairs}]",
            "data.val_size=0",
            f"train.init_adapter={sft}",
            f"train.max_steps={args.dpo_steps}",
            f"train.beta={args.beta}",
            f"output_dir={args.work / f'dpo-beta{args.beta:g}-{args.dpo_steps}'}",
        ],
    )
    dpo, dpo_seconds = train_once(dpo_config, "DPO")
    evaluation = {"max_new_tokens": args.reply_tokens, "batch_size": args.batch, "limit": args.persona_records}
    figures = {
        "sft_pairs": pair_figures(evaluate_run(sft, data=held_pairs, batch_size=args.batch)),
        "dpo_pairs": pair_figures(evaluate_run(dpo, batch_size=args.batch)),
        "sft_persona": persona_figures(evaluate_run(sft, data=sft_held_out, **evaluation)),
        "dpo_persona": persona_figures(evaluate_run(dpo, data=sft_held_out, **evaluation)),
    }
    line = {
        "bench": "preference_quality",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": read_cpu().name,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "load_at_start": [round(value, 2) for value in load],
        "load_at_end": [round(value, 2) for value in os.getloadavg()],
        "args": {key: str(value) for key, value in vars(args).items()},
        "seconds": {"total": round(time.time() - began), "sft": sft_seconds, "dpo": dpo_seconds},
        **figures,
    }
    print(json.dumps(line, ensure_ascii=False, indent=2))
    with args.results.open("a", encoding="utf-8") as results:
        results.write(json.dumps(line, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
