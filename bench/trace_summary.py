"""Host and GPU timelines of a profiled step, side by side: where a small step's time goes.

    python bench/trace_summary.py PROFILE.trace.json      # written by `lowtune bench --profile DIR`

Prints the span from the first to the last GPU kernel, how much of it the GPU was busy (the union of kernel
intervals), the kernels launched and what launching them cost the host, the host's waits for the GPU (synchronize,
blocking copies, `.item()`), and the CPU operators with the most self time. A step is bound by the host when the GPU
is idle for much of its span: then fewer launches and fewer syncs shorten it, and faster kernels do not.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as file:
        return [event for event in json.load(file)["traceEvents"] if event.get("ph") == "X"]


def busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarise(events: list[dict], steps: int) -> str:
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    operators = [e for e in events if e.get("cat") == "cpu_op"]
    first, last = min(e["ts"] for e in kernels), max(e["ts"] + e["dur"] for e in kernels)
    span = last - first
    gpu = busy([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    launches = [e for e in runtime if e["name"] in LAUNCHES]
    waits = defaultdict(float)
    counts = Counter()
    for event in runtime:
        if event["name"] in SYNCS:
            waits[event["name"]] += event["dur"]
            counts[event["name"]] += 1
    self_time = _self_times(operators)
    lines = [
        f"{steps} steps: {span / 1e3 / steps:.1f} ms a step from the first to the last GPU kernel; GPU busy "
        f"{gpu / 1e3 / steps:.1f} ms a step ({gpu / span:.0%})",
        f"kernels: {len(kernels) / steps:,.0f} a step, {sum(e['dur'] for e in kernels) / max(1, len(kernels)):.1f} us "
        f"each on average; launches cost the host {sum(e['dur'] for e in launches) / 1e3 / steps:.1f} ms a step",
        "host waits for the GPU, a step: "
        + (
            ", ".join(f"{name} {counts[name] / steps:.0f}x {waits[name] / 1e3 / steps:.1f} ms" for name in waits)
            or "none"
        ),
        "CPU operators by self time, a step (ms, calls):",
    ]
    for name, (total, calls) in sorted(self_time.items(), key=lambda item: -item[1][0])[:25]:
        lines.append(f"  {total / 1e3 / steps:8.2f}  {calls / steps:6.0f}  {name[:90]}")
    return "\n".join(lines)


def _self_times(operators: list[dict]) -> dict[str, tuple[float, int]]:
    """Each operator's time minus its children's, per name (operators nest by time on one thread)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_thread = defaultdict(list)
    for event in operators:
        by_thread[event["tid"]].append(event)
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, child time]
        for event in events:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= event["ts"]:
                _close(stack, totals)
            stack.append([event, 0.0])
        while stack:
            _close(stack, totals)
    return {name: (total, int(calls)) for name, (total, calls) in totals.items()}


def _close(stack: list[list], totals: dict[str, list[float]]) -> None:
    event, children = stack.pop()
    totals[event["name"]][0] += event["dur"] - children
    totals[event["name"]][1] += 1
    if stack:
        stack[-1][1] += event["dur"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trace", type=Path)
    parser.add_argument("--steps", type=int, default=2, help="steps in the trace (the bench profiles 2)")
    args = parser.parse_args()
    print(summarise(load(args.trace), args.steps))


if __name__ == "__main__":
    main()
