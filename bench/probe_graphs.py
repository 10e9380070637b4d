"""Can the small step be one CUDA graph, and what does it gain? A probe for issue 14 (run on the GPU machine).

    python bench/probe_graphs.py --checkpointing on|off [--layers N] [--dropout P]

Builds the bench's 4-bit Qwen-7B-shaped model with lowtune's LoRA, fused groups, liger parts and varlen attention,
takes the tutorial's merged 8 x 2 batches (16 records a pass, packed), and times one forward and backward pass
(`torch.autograd.grad` of the loss with respect to the adapters) three ways:
- eager: today's path (packed row, the resolved loss);
- bucketed: the row padded to a multiple of --bucket tokens, the record count to a power of two, the "masked" loss;
- graph: the bucketed pass captured once per bucket as a CUDA graph and replayed.
It prints each one's median time a pass, peak memory, and how far the graph's gradients are from the eager ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch

from lowtune.bench.model import build_random_model, qwen_7b_config
from lowtune.bench.recipes import SEVEN_PROJECTIONS
from lowtune.bench.worker import tutorial_rows
from lowtune.config import LoraSettings, RunConfig, TrainSettings
from lowtune.data.batching import LengthBucketBatchSampler
from lowtune.data.pack import PackedCollator
from lowtune.machine import this_machine
from lowtune.model.attention import set_attention
from lowtune.model.lora import attach_lora
from lowtune.model.qwen_tokenizer import build_qwen_tokenizer
from lowtune.train.graphs import GraphedPasses
from lowtune.train.kernels import apply_kernels
from lowtune.train.loss import install_hidden_state_loss
from lowtune.train.resolve import resolve_run


def on_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def graphed_pass(passes: GraphedPasses, params):
    """The pass through lowtune's graphs, returning (loss, gradients) like the eager pass (not accumulated)."""

    def run(batch: dict):
        for param in params:
            param.grad = None
        loss = passes(batch)
        return loss, [param.grad for param in params]

    return run


def timed(step, batches, repeat):
    times, result = [], None
    for _ in range(repeat):
        for batch in batches:
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = step(batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times[len(batches) :] or times), result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpointing", default="on", choices=["on", "off"])
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--bucket", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-liger", action="store_true", help="without liger's RMSNorm, RoPE and SwiGLU")
    parser.add_argument("--no-preserve-rng", action="store_true", help="checkpoints do not stash the RNG state")
    parser.add_argument("--profile", default=None, help="write a chrome trace of one graph replay here")
    args = parser.parse_args()
    tokenizer = build_qwen_tokenizer()
    rows = tutorial_rows(tokenizer)
    model = build_random_model(qwen_7b_config(args.layers), "4bit")
    train = TrainSettings(batch_size=8, gradient_accumulation=2, gradient_checkpointing=args.checkpointing == "on")
    config = RunConfig(
        lora=LoraSettings(r=8, alpha=32, dropout=args.dropout, target_modules=SEVEN_PROJECTIONS),
        train=train,
        output_dir=tempfile.mkdtemp(),
    )
    config.model.precision, config.model.quantization = "bf16", "4bit"
    lengths = [len(row["input_ids"]) for row in rows]
    resolved = resolve_run(config, this_machine(), model.config.to_dict(), lengths, chat_format="seed")
    print("resolved:", resolved.describe() if hasattr(resolved, "describe") else resolved.choices(), flush=True)
    liger = () if args.no_liger else tuple(p for p in resolved.liger if p != "fused_linear_cross_entropy")
    peft_model = attach_lora(model, config.lora, resolved.lora_targets, resolved.checkpointing)
    set_attention(peft_model.get_base_model(), resolved.attention)
    if args.no_preserve_rng:
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        for module in peft_model.modules():
            if getattr(module, "gradient_checkpointing", False):
                module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False, preserve_rng_state=False)
    apply_kernels(peft_model, dataclasses.replace(resolved, liger=liger))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    autocast = (
        (lambda: torch.autocast("cuda", torch.bfloat16)) if resolved.autocast == "bf16" else (lambda: nullcontext())
    )
    sampler = LengthBucketBatchSampler(lengths, 8, None, True, 0, merge=2)
    indices = sampler.plan(0)[: args.batches]
    records = max(len(i) for i in indices)
    packed = [on_device(PackedCollator()([rows[i] for i in batch]), "cuda") for batch in indices]
    bucketed = [on_device(PackedCollator(args.bucket)([rows[i] for i in batch]), "cuda") for batch in indices]
    tokens = statistics.mean(b["input_ids"].shape[1] for b in packed)
    for batch in packed + bucketed:
        batch["num_items_in_batch"] = (batch["labels"][:, 1:] != -100).sum()
    print(
        f"{len(indices)} merged batches of {records} records, {tokens:.0f} tokens on average; buckets "
        + ", ".join(str(b["input_ids"].shape[1]) for b in bucketed),
        flush=True,
    )

    def eager(batch):
        with autocast():
            loss = peft_model(**batch).loss
            # detached: a live graph would keep the adapters' gradient nodes, bound to this stream, into the capture
            return loss.detach(), torch.autograd.grad(loss, params)

    results = {}
    for name, kernel, batches in (("eager", resolved.loss, packed), ("bucketed", "masked", bucketed)):
        install_hidden_state_loss(peft_model.get_base_model(), kernel)
        torch.cuda.reset_peak_memory_stats()
        seconds, _ = timed(eager, batches, args.repeat)
        results[name] = [eager(b) for b in batches]
        print(
            f"{name:9s} ({kernel:7s}) {seconds * 1e3:7.1f} ms a pass  {tokens / seconds:7,.0f} tok/s  peak "
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
            flush=True,
        )
    torch.cuda.set_sync_debug_mode("error")  # the first op that waits for the GPU raises, with its traceback
    try:
        eager(bucketed[0])
        print("no host sync in a bucketed pass", flush=True)
    except RuntimeError:
        import traceback

        print("a host sync in the bucketed pass:\n" + "".join(traceback.format_exc().splitlines(True)[-24:]))
    torch.cuda.set_sync_debug_mode("default")
    passes = GraphedPasses(peft_model, params, autocast)
    graphed = graphed_pass(passes, params)
    torch.cuda.reset_peak_memory_stats()
    try:
        for batch in bucketed:
            graphed(batch)  # capture each bucket once
        seconds, _ = timed(graphed, bucketed, args.repeat)
    except Exception as error:  # the probe's question: what breaks capture
        print(f"graph capture failed: {type(error).__name__}: {error}", flush=True)
        raise
    print(
        f"graph     (masked ) {seconds * 1e3:7.1f} ms a pass  {tokens / seconds:7,.0f} tok/s  peak "
        f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB  ({passes.captured} graphs captured in "
        f"{passes.capture_seconds:.1f} s)",
        flush=True,
    )
    for label, other in (("bucketed", results["bucketed"]), ("eager", results["eager"])):
        worst_loss, worst_grad = 0.0, 0.0
        for batch, (loss, grads) in zip(bucketed, other, strict=True):
            g_loss, g_grads = (t.clone() if i == 0 else [x.clone() for x in t] for i, t in enumerate(graphed(batch)))
            worst_loss = max(worst_loss, abs(g_loss.item() - loss.item()) / abs(loss.item()))
            for a, b in zip(g_grads, grads, strict=True):
                worst_grad = max(worst_grad, ((a - b).norm() / b.norm().clamp(min=1e-12)).item())
        print(f"graph vs {label}: worst relative loss difference {worst_loss:.2e}, gradient {worst_grad:.2e}")
    if args.checkpointing == "on":  # dropout masks: does the recomputation inside a graph redraw the forward's?
        seeded = []
        for _ in range(2):
            torch.cuda.manual_seed(1234)
            loss, grads = graphed(bucketed[0])
            seeded.append((loss.clone(), [g.clone() for g in grads]))
        for module in peft_model.modules():
            if getattr(module, "gradient_checkpointing", False):
                module.gradient_checkpointing = False
        plain = graphed_pass(GraphedPasses(peft_model, params, autocast), params)
        plain(bucketed[0])  # captured without checkpointing
        torch.cuda.manual_seed(1234)
        loss, grads = plain(bucketed[0])
        same_seed = max(
            ((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(seeded[0][1], seeded[1][1], strict=True)
        )
        worst = max(
            ((a - b).norm() / b.norm().clamp(min=1e-12)).item() for a, b in zip(seeded[0][1], grads, strict=True)
        )
        print(
            f"dropout {args.dropout}: replays with one seed differ by {same_seed:.2e}; checkpointed against not: "
            f"loss {abs(seeded[0][0].item() - loss.item()):.2e}, worst gradient {worst:.2e}",
            flush=True,
        )
    if args.profile:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            graphed(bucketed[0])
            torch.cuda.synchronize()
        prof.export_chrome_trace(args.profile)


if __name__ == "__main__":
    main()
