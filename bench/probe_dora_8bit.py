"""Does peft's DoRA train on a bitsandbytes 8-bit base on CUDA? (issue 18: lowtune refuses DoRA on 8-bit because on
the CPU, peft 0.22 + bitsandbytes 0.50, it fails at the second step; `config.LoraSettings.quantization_problem`.)

    PYTHONPATH=src:/tmp/site python bench/probe_dora_8bit.py      # on the GPU machine

A tiny Qwen2 in 8-bit, LoRA and DoRA r 8 on all seven projections, 6 steps with a no-grad eval pass between steps (as
lowtune's evaluations): prints each variant's losses, or how it fails.
"""

from __future__ import annotations

import tempfile

import bitsandbytes
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 6


def tiny_model(folder: str) -> None:
    torch.manual_seed(0)
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=1000, num_key_value_heads=2, **shape)).save_pretrained(folder)


def train(folder: str, dora: bool) -> list[float]:
    """The losses of STEPS steps; raises where bitsandbytes or peft fails."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, device_map={"": "cuda"}, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_dora=dora, target_modules=PROJECTIONS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 1000, (4, 64), device="cuda")
    losses: list[float] = []
    for _ in range(STEPS):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            model(input_ids=ids[:1])
        model.train()
        losses.append(round(loss.item(), 4))
    return losses


def main() -> None:
    versions = (torch, peft, bitsandbytes, transformers)
    print(", ".join(f"{module.__name__} {module.__version__}" for module in versions), torch.cuda.get_device_name())
    folder = tempfile.mkdtemp()
    tiny_model(folder)
    for dora in (False, True):
        name = "DoRA" if dora else "LoRA"
        try:
            print(f"{name} on 8-bit, CUDA: trains, losses {train(folder, dora)}")
        except Exception as error:  # the probe's answer, not a failure of the probe
            print(f"{name} on 8-bit, CUDA: fails: {type(error).__name__}: {str(error)[:300]}")


if __name__ == "__main__":
    main()
