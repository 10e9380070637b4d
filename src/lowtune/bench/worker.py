"""One benchmark measurement in a fresh process: `python -m lowtune.bench.worker RECIPE QUANTIZATION [options]`.

Prints one JSON line (the `Measurement`) as its last line of output.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["unsloth"]:
    import unsloth  # noqa: F401  (Unsloth patches transformers on import, so it must come first)

import argparse
import json
import logging

from lowtune.bench.model import build_random_model, qwen_7b_config
from lowtune.bench.recipes import JOB_DROPOUT, TUTORIAL_BATCH, lowtune_recipe, tutorial_recipe
from lowtune.data.encode import encode_records
from lowtune.data.read import read_records, resolve_data_path
from lowtune.model.qwen_tokenizer import build_qwen_tokenizer

MAX_LENGTH = 384  # the tutorial's MAX_LENGTH


def tutorial_rows(tokenizer) -> list[dict[str, list[int]]]:
    """The bundled Chat-甄嬛 set encoded exactly as the tutorial's process_func does (lowtune's `seed` format)."""
    records = [record for _, record in read_records(resolve_data_path("builtin:huanhuan"))]
    return encode_records(records, tokenizer, template="seed", max_length=MAX_LENGTH)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", choices=["tutorial", "lowtune", "unsloth"])
    parser.add_argument("quantization", choices=["4bit", "8bit", "none"])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="a token budget per step")
    parser.add_argument("--batch", default=None, help="records per micro-batch x accumulation, e.g. 8x2")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick check")
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of two steps here")
    parser.add_argument(
        "--checkpointing", default=None, help="lowtune's train.gradient_checkpointing (auto), Unsloth's (offload)"
    )
    parser.add_argument("--dropout", type=float, default=JOB_DROPOUT, help="LoRA dropout (tutorial, lowtune)")
    args = parser.parse_args()
    batch = tuple(int(n) for n in args.batch.split("x")) if args.batch else None
    if (batch is None) == (args.tokens_per_batch is None):
        parser.error("give --tokens-per-batch or --batch")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    tokenizer = build_qwen_tokenizer()
    rows = tutorial_rows(tokenizer)
    config = qwen_7b_config(args.layers)
    if args.recipe == "unsloth":
        from lowtune.bench.peer_unsloth import unsloth_recipe

        result = unsloth_recipe(
            config,
            tokenizer,
            rows,
            args.quantization,
            args.steps,
            args.warmup,
            args.tokens_per_batch,
            batch,
            args.checkpointing or "offload",
        )
    else:
        model = build_random_model(config, args.quantization)
        if args.recipe == "tutorial":
            result = tutorial_recipe(
                model,
                tokenizer,
                rows,
                args.quantization,
                args.steps,
                args.warmup,
                batch or TUTORIAL_BATCH,
                args.dropout,
            )
        else:
            result = lowtune_recipe(
                model,
                tokenizer,
                rows,
                args.quantization,
                args.steps,
                args.warmup,
                args.tokens_per_batch,
                args.profile,
                args.checkpointing or "auto",
                batch,
                args.dropout,
            )
    print(json.dumps(result.to_dict()), flush=True)


if __name__ == "__main__":
    main()
