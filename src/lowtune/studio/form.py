"""The new-run form, generated from the config schema, and its answers checked as `lowtune train` checks a file.

The page sends `section.key=value` lines (the CLI's `--set`); the settings they give are validated by the same code
as a YAML file, so every message is the CLI's, and each is placed at the field it names.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from lowtune.config import RunConfig, settings_from_overrides, validate_settings
from lowtune.errors import Problem, UserError
from lowtune.studio.workspace import Workspace
from lowtune.train.preflight import check_before_loading

FORM_SOURCE = "the form"
FIELD_NAMED = re.compile(r"\b((?:model|lora|data|train)\.\w+|output_dir)\b")


def form_schema() -> list[dict[str, Any]]:
    """Each section of the config with its fields: name, description, default and kind (choice, with its
    choices; bool; number; text; lines)."""
    sections = []
    for name, field in RunConfig.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            fields = [_field(f"{name}.{key}", sub) for key, sub in model.model_fields.items()]
            sections.append({"name": name, "description": model.__doc__ or "", "fields": fields})
        else:
            sections.append({"name": "run", "description": "", "fields": [_field(name, field)]})
    return sections


def form_values(path: Path) -> dict[str, str]:
    """A config file's settings as the form shows them (`section.key` -> text), to fill the form from it."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError.one(f"cannot read this config: {error}", path) from None
    if not isinstance(raw, dict):
        raise UserError.one("the config must be a mapping of sections (model, lora, data, train, output_dir)", path)
    values = {}
    for name, value in raw.items():
        if isinstance(value, dict):
            values |= {f"{name}.{key}": _shown(setting) for key, setting in value.items()}
        else:
            values[name] = _shown(value)
    return values


def checked_settings(overrides: list[str], workspace: Workspace) -> tuple[str, RunConfig | None, list[dict]]:
    """The YAML that the form's answers make, their config when valid, and every problem found (each with the
    field it belongs to): the config's, then the paths' (confined to the workspace), then the data's."""
    try:
        raw = settings_from_overrides(overrides)
    except UserError as error:
        return "", None, _placed(error.problems)
    text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True) if raw else ""
    try:
        config = validate_settings(raw, FORM_SOURCE)
    except UserError as error:
        return text, None, _placed(error.problems)
    problems = _path_problems(config, workspace)
    if not problems:
        try:
            check_before_loading(config, check_output=False)  # what lowtune train checks before torch loads
        except UserError as error:
            problems = [dict(entry, field="data.files") for entry in _placed(error.problems)]
    return text, None if problems else config, problems


def _path_problems(config: RunConfig, workspace: Workspace) -> list[dict]:
    """Files and folders the config names, resolved in the workspace: refused outside it (models: or a model
    folder); data and output paths are made absolute so that the run reads what the form checked."""
    problems = []
    for index, entry in enumerate(config.data.files):
        path = entry if isinstance(entry, str) else entry.path
        if str(path).startswith("builtin:"):
            continue
        try:
            resolved = str(workspace.path(path))
        except UserError as error:
            problems += [dict(entry, field="data.files") for entry in _placed(error.problems)]
            continue
        if isinstance(entry, str):
            config.data.files[index] = resolved
        else:
            entry.path = resolved
    checks = [("output_dir", config.output_dir, False)]
    if config.model.path is not None:
        checks.append(("model.path", config.model.path, True))
    for field, path, models_too in checks:
        try:
            resolved = str(workspace.path(path, models_too))
        except UserError as error:
            problems += [dict(entry, field=field) for entry in _placed(error.problems)]
            continue
        if field == "output_dir":
            config.output_dir = resolved
        else:
            config.model.path = resolved
    return problems


def _placed(problems: list[Problem]) -> list[dict]:
    """Each problem as the CLI prints it, with the form field it names (None: the whole form)."""
    placed = []
    for problem in problems:
        named = FIELD_NAMED.search(problem.message)
        text = str(problem).removeprefix(f"{FORM_SOURCE}: ")
        placed.append({"field": named[1] if named else None, "message": text})
    return placed


def _field(key: str, field: Any) -> dict[str, Any]:
    kind, choices = _kind(field.annotation)
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json")
    return {
        "key": key,
        "description": field.description or "",
        "default": _shown(default),
        "kind": kind,
        "choices": choices,
    }


def _kind(annotation: Any) -> tuple[str, list[str]]:
    """How the form asks for a value, and the choices of a choice ("" stands for null: the setting left unset)."""
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    unset = [""] if type(None) in options else []
    literals = [str(value) for option in options if get_origin(option) is Literal for value in get_args(option)]
    if bool in options:
        return ("choice", [*unset, *literals, "true", "false"]) if literals or unset else ("bool", [])
    if literals and all(get_origin(option) is Literal or option is type(None) for option in options):
        return "choice", unset + literals
    if any(get_origin(option) is list for option in options):
        return "lines", []
    if all(option in (int, float, type(None)) for option in options):
        return "number", []
    return "text", []


def _shown(value: Any) -> str:
    """A default as the form shows it: what a user would type for it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "\n".join(_line(item) for item in value)
    return str(value)


def _line(item: Any) -> str:
    """One entry of a list field: a plain string, or a flow mapping (a data.files entry with more than a path)."""
    if isinstance(item, BaseModel):
        item = item.model_dump(mode="json", exclude_defaults=True)
        if list(item) == ["path"]:
            return item["path"]
    return item if isinstance(item, str) else yaml.safe_dump(item, default_flow_style=True, allow_unicode=True).strip()
