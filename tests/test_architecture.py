"""The package's layers only point down: errors <- model <- data <- io <- evaluation <- training <- tools
<- cli.

Every `llm_lightning` import in the package's source, at module level or inside a function,
is read from the syntax tree; an import of a higher layer fails the test, so a cycle like
checkpoint -> training -> tools -> checkpoint cannot come back. `io/atomic.py` (standard
library only) belongs to the bottom layer with `errors`, so prepare (data) and checkpoints
(training) share one way of writing files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llm_lightning"
# Bottom first. A module belongs to the first layer whose prefix it starts with.
LAYERS = [
    ("llm_lightning.errors", "llm_lightning.io.atomic"),
    ("llm_lightning.model",),
    ("llm_lightning.data",),
    ("llm_lightning.io",),
    ("llm_lightning.evaluation",),  # reads checkpoints through io; training adds its callback
    ("llm_lightning.training",),
    ("llm_lightning.tools",),
    ("llm_lightning.cli", "llm_lightning.__main__"),
]


def layer_of(module: str) -> int:
    if module == "llm_lightning":  # the package's __init__: its version only
        return 0
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imported_modules(source: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [name for name in names if name == "llm_lightning" or name.startswith("llm_lightning.")]


def upward_imports(files: dict[str, str]) -> list[str]:
    """'importer -> imported' for every import of a higher layer, in sources keyed by module name."""
    found = []
    for module, source in files.items():
        for imported in imported_modules(source):
            if imported != "llm_lightning" and layer_of(imported) > layer_of(module):
                found.append(f"{module} -> {imported}")
    return found


def package_sources() -> dict[str, str]:
    return {module_name(path): path.read_text() for path in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_higher_layer():
    assert upward_imports(package_sources()) == []


@pytest.mark.parametrize(
    "module, line",
    [
        ("llm_lightning.model.hf", "from llm_lightning.io.checkpoint import load_checkpoint"),
        ("llm_lightning.data.format", "import llm_lightning.training.module"),
        ("llm_lightning.io.atomic", "from llm_lightning.model import ModelConfig"),
        ("llm_lightning.io.checkpoint", "    from llm_lightning.training.module import LanguageModel"),
    ],
)
def test_the_check_catches_an_upward_import(module, line):
    """The check fails when a lower layer imports a higher one, even inside a function."""
    sources = package_sources()
    indented = line.startswith(" ")
    sources[module] += f"\n\ndef _late():\n{line}\n" if indented else f"\n{line}\n"
    assert len(upward_imports(sources)) == 1
