"""How closely each GGUF type follows the merged model in llama.cpp (issue 15): the main job cut to a few steps on
the embedded SmolLM2, exported as every type lowtune writes, each run in llama.cpp (llama-cpp-python).

    python bench/gguf_agreement.py [--steps 3] [--prompts 20]

Prints, per type: the file size, whether llama.cpp's greedy answers equal transformers' on the merged fp32 model, and
the share of next tokens it picks alike along transformers' answers (teacher-forced).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import llama_cpp

from lowtune.config import load_config
from lowtune.data.read import Message, read_records, resolve_data_path
from lowtune.export.gguf import TYPES, export_gguf
from lowtune.export.merge import merged_chat_model
from lowtune.infer.session import GenerationSettings
from lowtune.recipe import run

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=20)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    overrides = [f"train.max_steps={args.steps}", "data.val_size=0", "train.eval_steps=null", "train.save_steps=0"]
    adapter = run(load_config(REPO / "examples" / "huanhuan-qlora.yaml", [*overrides, f"output_dir={folder / 'run'}"]))
    merged = merged_chat_model(adapter, "fp32")
    stop = merged.chat_format.stop_token_ids
    records = [record for _, record in read_records(resolve_data_path("builtin:huanhuan"))][-args.prompts :]
    prompts = [merged.chat_format.encode_prompt([Message("user", r["instruction"])]) for r in records]
    answers = [merged.generate_ids(ids, GenerationSettings(max_new_tokens=20)) for ids in prompts]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    versions = f"Python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__}"
    print(f"{time.strftime('%Y-%m-%d')}, {model_name}, {versions}")
    print("type   MB      greedy answers equal   next token alike")
    for kind in TYPES:
        path = export_gguf(folder / f"smol-{kind}.gguf", kind, adapter=adapter)
        model = llama_cpp.Llama(str(path), n_ctx=1024, verbose=False, logits_all=True)
        equal = same = total = 0
        for ids, answer in zip(prompts, answers, strict=True):
            model.reset()
            model.eval(ids + answer)
            picked = model.scores[len(ids) - 1 : len(ids) + len(answer) - 1].argmax(-1)
            same += int((picked == answer).sum())
            total += len(answer)
            greedy = []
            for token in model.generate(ids, temp=0.0, top_k=1, reset=True):
                greedy.append(token)
                if token in stop or len(greedy) == len(answer):
                    break
            equal += greedy == answer
        size = path.stat().st_size / 1e6
        print(f"{kind:6s} {size:6.1f}  {equal:3d} of {len(prompts):<3d}              {same / total:.1%}")


if __name__ == "__main__":
    main()
