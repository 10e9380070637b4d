"""The package's layers import one way: data -> model -> train -> infer -> eval / export -> recipe -> bench / studio
-> cli.

Read from the source (every `import lowtune...`, at the top of a module or inside a function), so a lazy import
that runs back up is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowtune

PACKAGE = Path(lowtune.__file__).parent
# Lower numbers may be imported by higher ones, never the other way; one number may import itself.
LAYERS = {
    "errors": 0,
    "config": 0,
    "machine": 0,
    "internals": 0,
    "data": 1,
    "model": 2,
    "train": 3,
    "infer": 4,
    "eval": 5,
    "export": 5,
    "recipe": 6,
    "bench": 7,
    "studio": 7,  # the browser front end, a peer of bench: both sit on the recipe and below, under the CLI
    "cli": 8,
    "__main__": 9,
    "__init__": 9,  # the package's lazy public API
}


def layer_of(module: str) -> int:
    return LAYERS[module.split(".")[1] if "." in module else "__init__"]


def is_module(name: str) -> bool:
    """`from lowtune import internals` names a module; `from lowtune import __version__` names the package root."""
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowtune"):
            found |= (
                {f"lowtune.{alias.name}" for alias in node.names if is_module(alias.name)}
                if node.module == "lowtune"
                else {node.module}
            )
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lowtune")}
    return found


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "lowtune." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        own = layer_of(module.removesuffix(".__init__") if module != "lowtune.__init__" else module)
        for imported in imports(path):
            if imported != "lowtune" and layer_of(imported) > own:
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)


def test_every_module_has_a_layer():
    tops = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.glob("*")}
    tops -= {"__pycache__", "resources", "py.typed"}
    assert tops <= set(LAYERS), tops - set(LAYERS)
