"""An adapter folder that vLLM's LoRA loader takes, with the chat template of the run and the command that serves it.

vLLM serves a PEFT adapter beside its base model (`vllm serve BASE --enable-lora --lora-modules NAME=FOLDER`) and
refuses one it cannot run: DoRA, `modules_to_save`, adapter biases, modules outside its LoRA layers (for Llama,
Qwen2 and Qwen3: the seven projections, which it packs as qkv_proj and gate_up_proj), or a rank above
`--max-lora-rank` (16 unless raised, to one of MAX_LORA_RANKS). Those rules, read from vLLM's LoRA loader
(`vllm/lora/peft_helper.py`, `vllm/config/lora.py`), are checked here before anything is written. lowtune trains on
Qwen-1 converted to Qwen2, so its adapters carry Qwen2 names: they are served on the converted folder. vLLM stops
at the base folder's end-of-text token and generation config; clients can pass the end of turn as a stop token.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

from lowtune.data.templates import load_chat_format
from lowtune.errors import Problem, UserError
from lowtune.export.merge import chat_template
from lowtune.infer.session import base_model_settings
from lowtune.model import arch
from lowtune.model.arch import PROJECTIONS
from lowtune.model.arch.qwen1 import is_qwen1_checkpoint
from lowtune.model.load import read_tokenizer, resolve_model_path

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
DEFAULT_MAX_LORA_RANK = 16
ADAPTER_FILES = ("adapter_model.safetensors",)
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def vllm_problems(config: dict[str, Any]) -> list[Problem]:
    """What in a PEFT adapter_config.json vLLM's LoRA loader would refuse."""
    problems = []
    if config.get("use_dora"):
        fix = "train plain LoRA (lora.variant: lora or rslora)"
        problems.append(Problem("vLLM does not serve DoRA adapters", fix=fix))
    if config.get("modules_to_save"):
        problems.append(Problem(f"vLLM takes no modules_to_save ({config['modules_to_save']})"))
    if config.get("bias", "none") != "none":
        problems.append(Problem(f"vLLM serves adapters without biases, not bias={config['bias']!r}"))
    outside = sorted({name.rsplit(".", 1)[-1] for name in _targets(config)} - set(PROJECTIONS))
    if outside:
        problems.append(
            Problem(
                f"vLLM puts LoRA on the seven projections only, not on {', '.join(outside)}",
                fix="train with lora.target_modules among " + ", ".join(PROJECTIONS),
            )
        )
    if config["r"] > MAX_LORA_RANKS[-1]:
        problems.append(Problem(f"rank {config['r']} is above vLLM's largest --max-lora-rank, {MAX_LORA_RANKS[-1]}"))
    return problems


def export_vllm(adapter: str | Path, out: str | Path, name: str | None = None, overwrite: bool = False) -> str:
    """Writes `adapter` (a lowtune run folder or checkpoint) as a folder vLLM serves; returns the command.

    The folder holds the adapter's weights, an adapter_config.json with vLLM's rules met (target modules by their
    short names when they cover every layer), and the run's chat template (`--chat-template`: the base's own may
    render another format, and Qwen-1 ships none).
    """
    adapter, out = Path(adapter), Path(out)
    settings = base_model_settings(adapter)  # first: a folder that is not a run stops here, with the reason
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    problems = vllm_problems(config)
    if out.exists() and any(out.iterdir()) and not overwrite:
        problems.append(Problem("the output folder is not empty", out, fix="choose another --out, or pass --overwrite"))
    if problems:
        raise UserError(problems)
    base = resolve_model_path(settings.path)
    tokenizer = read_tokenizer(adapter)
    chat_format = load_chat_format(adapter, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    for file in ADAPTER_FILES:
        shutil.copyfile(adapter / file, out / file)
    layers = arch.read_model_config(base)["num_hidden_layers"]
    served = dict(config, target_modules=_short_targets(config, layers), base_model_name_or_path=str(base))
    (out / "adapter_config.json").write_text(json.dumps(served, indent=2), encoding="utf-8")
    (out / CHAT_TEMPLATE_FILE).write_text(chat_template(chat_format), encoding="utf-8")
    return serve_command(base, out, name or adapter.resolve().name, config["r"])


def serve_command(base: Path, out: Path, name: str, rank: int) -> str:
    """The shell command that serves the exported adapter (after converting a Qwen-1 base, which vLLM would run
    through its remote code with other module names)."""
    convert = ""
    if is_qwen1_checkpoint(base):
        converted = base.with_name(base.name + "-qwen2")
        convert = f"lowtune convert qwen1 {shlex.quote(str(base))} {shlex.quote(str(converted))} && "
        base = converted
    words = ["vllm", "serve", str(base), "--enable-lora", "--lora-modules", f"{name}={out}"]
    words += ["--chat-template", str(out / CHAT_TEMPLATE_FILE)]
    if rank > DEFAULT_MAX_LORA_RANK:
        words += ["--max-lora-rank", str(next(r for r in MAX_LORA_RANKS if r >= rank))]
    return convert + " ".join(shlex.quote(word) for word in words)


def _targets(config: dict[str, Any]) -> list[str]:
    targets = config["target_modules"]
    return [targets] if isinstance(targets, str) else list(targets)


def _short_targets(config: dict[str, Any], layers: int) -> list[str]:
    """The projections' short names (as peft and vLLM expect) when the adapter covers them in each of the model's
    `layers`, else the full paths (short names would put adapters on every layer)."""
    targets = _targets(config)
    short = sorted({name.rsplit(".", 1)[-1] for name in targets})
    every_layer = all("." not in name for name in targets) or len(set(targets)) == len(short) * layers
    return short if every_layer else targets
