"""Plain LoRA, DoRA and rsLoRA side by side on the embedded default (examples/huanhuan-qlora.yaml): the same seed,
data, steps and learning rate; held-out eval loss at the end, seconds a step and peak resident memory.

Each variant trains in its own process, so that its peak resident memory is its own. All three keep the example's
r 8, alpha 16 and learning rate 1e-3: the settings a user who switches `lora.variant` has. rsLoRA's scale is then
alpha / sqrt(r) = 5.66 instead of plain LoRA's alpha / r = 2, so the same learning rate moves it ~2.8x further.

Run: PYTHONPATH=src python bench/lora_variants.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "huanhuan-qlora.yaml"
VARIANTS = {
    "lora": ["lora.variant=lora"],
    "dora": ["lora.variant=dora"],
    "rslora": ["lora.variant=rslora"],
}


def train_one(name: str, steps: int, output: Path) -> dict:
    """One variant's run, in this process; its figures."""
    from lowtune.config import load_config
    from lowtune.recipe import run

    overrides = [*VARIANTS[name], f"train.max_steps={steps}", f"train.eval_steps={steps}", "train.save_steps=0"]
    config = load_config(EXAMPLE, [*overrides, f"output_dir={output}"])
    folder = run(config, overwrite=True)
    summary = json.loads((folder / "run_summary.json").read_text())
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    throughput = summary["throughput"]
    return {
        "variant": name,
        "steps": summary["steps"],
        "eval_loss_start": round(evals[0], 4),
        "eval_loss_end": round(evals[-1], 4),
        "train_loss_last": summary["last_logged_loss"],
        "seconds_per_step": round(throughput["seconds"] / max(1, summary["steps"] - 1), 2),  # first step apart
        "peak_rss_gib": summary["peak_memory_gib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", choices=VARIANTS, help="run only this variant here (the bench's own child)")
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as folder:
            print("RESULT " + json.dumps(train_one(args.one, args.steps, Path(folder) / "run")), flush=True)
        return
    for name in VARIANTS:
        child = subprocess.run(
            [sys.executable, __file__, "--steps", str(args.steps), "--one", name],
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(line for line in child.stdout.splitlines() if line.startswith("RESULT "))
        print(line.removeprefix("RESULT "), flush=True)


if __name__ == "__main__":
    main()
