"""The packages form layers, and imports flow one way only:

    titok_core -> tokenizer -> generator -> sampling -> eval -> titok_bench

A package may import itself and any package before it in this list, never one after it; the
ground floor, titok_core, imports none of the others. Every ``import`` statement counts, at
module level or inside a function (a deferred import is still a dependency), relative ones too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

LAYERS = ["titok_core", "tokenizer", "generator", "sampling", "eval", "titok_bench"]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (a file under ``root``), however deeply nested."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                found.append((node.lineno, node.module))
                continue
            base = package.split(".")  # relative: resolve against this file's package
            base = [p for p in base[: len(base) - (node.level - 1)] if p]
            if node.module:
                found.append((node.lineno, ".".join(base + [node.module])))
            else:  # from . import x: x is a module of that package
                found += [(node.lineno, ".".join(base + [alias.name])) for alias in node.names]
    return found


def _sources(layer: str) -> list[Path]:
    return sorted(p for p in (REPO / layer).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_layer_is_a_package_with_sources():
    for layer in LAYERS:
        assert (REPO / layer / "__init__.py").is_file(), layer
        assert _sources(layer), layer


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_flow_one_way(layer):
    rank = {name: i for i, name in enumerate(LAYERS)}
    allowed = set(LAYERS[: rank[layer] + 1])
    wrong = []
    for path in _sources(layer):
        for line, target in imported_modules(path):
            top = target.split(".")[0]
            if top in rank and top not in allowed:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not wrong, f"{layer} may import only {', '.join(sorted(allowed, key=rank.get))}:\n" + "\n".join(wrong)


def test_the_ground_floor_imports_no_other_layer():
    others = set(LAYERS) - {"titok_core"}
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {target}"
        for path in _sources("titok_core")
        for line, target in imported_modules(path)
        if target.split(".")[0] in others
    ]
    assert not wrong, "\n".join(wrong)


def test_the_parser_sees_nested_and_relative_imports(tmp_path):
    """The checker itself: function-level, conditional and relative imports are all found."""
    pkg = tmp_path / "titok_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        "import os\n"
        "def f():\n"
        "    from generator.sampler import sample_tokens\n"
        "    if True:\n"
        "        import eval.gfid as g\n"
        "from . import images\n"
        "from .. import tokenizer\n"
    )
    got = sorted(imported_modules(pkg / "mod.py", root=tmp_path))
    assert got == [(1, "os"), (3, "generator.sampler"), (5, "eval.gfid"), (6, "titok_core.images"), (7, "tokenizer")]
