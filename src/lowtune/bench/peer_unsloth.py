"""The fastest peer, Unsloth, on the same model, data, LoRA and token budget (only where its packages are present).

Unsloth loads from a folder, so the random model is saved first. With a token budget it is fed rows of 2048 tokens
made of whole records laid end to end, `tokens_per_batch / 2048` rows per step, with its dense causal attention:
records in a row see each other (Unsloth's own packing is not used because it is not available on every path), which
favours it slightly against lowtune's exact per-record attention. With records x accumulation it trains as its
notebooks do: `per_device_train_batch_size` records padded to the longest, `gradient_accumulation_steps` of them.
Its LoRA dropout is 0: its fast path needs it.
"""

from __future__ import annotations

import random
import sys
import tempfile

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Trainer, TrainingArguments

from lowtune.bench.model import build_random_model
from lowtune.bench.recipes import (
    LOGGING_STEPS,
    SAME_SAMPLES,
    SEVEN_PROJECTIONS,
    Measurement,
    Rows,
    same_samples_loss,
    timed_training,
)
from lowtune.data.pack import PaddedCollator

ROW_TOKENS = 2048
PEER_CHECKPOINTING = {"offload": "unsloth", "false": False}  # the bench's name: Unsloth's setting


def concatenated_rows(rows: Rows, length: int, seed: int = 0) -> Rows:
    """Records laid end to end (shuffled) and cut into rows of `length` tokens; a record never spans two rows."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out, ids, labels = [], [], []
    for index in order:
        row = rows[index]
        if len(ids) + len(row["input_ids"]) > length:
            out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
            ids, labels = [], []
        ids, labels = ids + row["input_ids"], labels + [-100] + row["labels"][1:]
    return out


def unsloth_recipe(
    config: Qwen2Config,
    tokenizer: PreTrainedTokenizerBase,
    rows: Rows,
    quantization: str,
    steps: int,
    warmup: int,
    tokens_per_batch: int | None,
    batch: tuple[int, int] | None = None,
    checkpointing: str = "offload",
) -> Measurement:
    """Unsloth's training; `checkpointing` "offload" is its own `use_gradient_checkpointing="unsloth"`, "false" none."""
    from unsloth import FastLanguageModel

    if checkpointing not in PEER_CHECKPOINTING:
        raise ValueError(f"Unsloth's checkpointing is one of {PEER_CHECKPOINTING}, not {checkpointing!r}")

    folder = tempfile.mkdtemp()
    model = build_random_model(config, "none")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    model, _ = FastLanguageModel.from_pretrained(
        model_name=folder,
        max_seq_length=ROW_TOKENS,
        dtype=torch.bfloat16,
        load_in_4bit=quantization == "4bit",
        load_in_8bit=quantization == "8bit",
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=8,
        lora_alpha=32,
        lora_dropout=0,
        target_modules=SEVEN_PROJECTIONS,
        bias="none",
        use_gradient_checkpointing=PEER_CHECKPOINTING[checkpointing],
        random_state=0,
    )
    torch.cuda.reset_peak_memory_stats()
    collator = PaddedCollator(tokenizer.pad_token_id)
    try:
        same_loss = same_samples_loss(model, rows[:SAME_SAMPLES], collator, 8)
    except Exception as error:  # a peer's forward may not take lowtune's loss arguments; its speed still counts
        print(f"unsloth: no loss on the same samples ({error!r})", file=sys.stderr)
        same_loss = None
    records, accumulation = batch or (tokens_per_batch // ROW_TOKENS, 1)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=records,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-4,
        logging_steps=LOGGING_STEPS,
        max_steps=steps,
        bf16=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    train_rows = rows if batch else concatenated_rows(rows, ROW_TOKENS)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, data_collator=collator)
    return timed_training("unsloth", quantization, trainer, warmup, steps, same_loss)
