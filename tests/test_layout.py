"""The package's layering: no package imports one above it, and no import cycle between packages.

Every module under ``src/constitutional`` is parsed with :mod:`ast`; every import counts, at
module level or inside a function (a lazy import is still a dependency). From the bottom:

* ``core`` imports nothing of ours;
* ``models`` and ``prompts`` import only ``core``;
* ``constitution`` imports only ``core``; ``train`` (shared training helpers)
  imports ``core`` and ``models``;
* ``sl`` and ``rl`` import those (and themselves), not each other;
* ``evaluate`` imports ``core``, ``models``, ``prompts``, ``constitution`` and, of ``rl``, only
  the modules in :data:`EVALUATE_MAY_USE` (nothing in ``rl`` imports ``evaluate``);
* ``distributed``, ``config``, ``pipeline`` and the CLI are on top.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "constitutional"

_BASE = {"core", "models", "prompts", "constitution", "train"}
_STAGES = _BASE | {"sl", "rl", "evaluate"}
#: What each package may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "models": {"core"},
    "prompts": {"core"},
    "constitution": {"core"},
    "train": {"core", "models"},
    "sl": set(_BASE),
    "rl": set(_BASE),
    "evaluate": {"core", "models", "prompts", "constitution", "rl"},
    "distributed": set(_STAGES),
    "config": _STAGES | {"distributed"},
    "pipeline": _STAGES | {"distributed", "config"},
    "cli": _STAGES | {"distributed", "config", "pipeline"},
}
#: The modules of ``rl`` that ``evaluate`` may import.
EVALUATE_MAY_USE = {"constitutional.rl", "constitutional.rl.feedback", "constitutional.rl.gates",
                    "constitutional.rl.preference", "constitutional.rl.prompts"}


def package_of(module: str) -> str:
    """``constitutional.rl.label`` → ``rl``; the CLI modules (``cli``, ``cli_*``, ``__main__``)
    are ``cli``; the package root (``__version__`` only) counts as ``core``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    top = parts[1]
    if top == "__main__" or top == "cli" or top.startswith("cli_"):
        return "cli"
    return top


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> Iterator[tuple[str, int]]:
    """``(imported module, line)`` for every import of one of our modules in ``path``; ``from X
    import Y`` names ``X.Y`` when ``Y`` is a module of ours, else ``X``."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if _is_module(sub, root) else target), node.lineno


def _is_module(module: str, root: Path) -> bool:
    parts = module.split(".")
    if parts[0] != root.name:
        return False
    base = root.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def edges(root: Path) -> list[tuple[str, str, str, str]]:
    """``(from package, to package, imported module, "file:line")`` for every import of ours
    across packages."""
    out = []
    for path in sorted(root.rglob("*.py")):
        src = module_name(path, root)
        for target, line in imports(path, root):
            if target != root.name and not target.startswith(root.name + "."):
                continue
            a, b = package_of(src), package_of(target)
            if a != b:
                out.append((a, b, target, f"{path.relative_to(root.parent)}:{line}"))
    return out


def violations(root: Path) -> list[str]:
    """Every import that goes up, sideways or into a package not in :data:`ALLOWED`."""
    found = []
    for a, b, target, where in edges(root):
        if a not in ALLOWED:
            found.append(f"{where}: package {a!r} is not in the layering (add it to ALLOWED)")
        elif b not in ALLOWED[a]:
            found.append(f"{where}: {a} imports {target} ({b} is not below {a})")
        elif (a, b) == ("evaluate", "rl") and target not in EVALUATE_MAY_USE:
            found.append(f"{where}: evaluate imports {target} (of rl, evaluate may import only "
                         f"{', '.join(sorted(EVALUATE_MAY_USE))})")
    return found


def cycles(root: Path) -> list[str]:
    """Each import cycle between packages, with one import per step."""
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for a, b, target, where in edges(root):
        graph[a].setdefault(b, f"{where} ({target})")
    found: list[str] = []
    seen: set[frozenset[str]] = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, {})):
            if nxt == path[0]:
                loop = [*path, nxt]
                if frozenset(loop) not in seen:
                    seen.add(frozenset(loop))
                    steps = "; ".join(f"{x} → {y}: {graph[x][y]}" for x, y in pairwise(loop))
                    found.append(f"cycle {' → '.join(loop)}: {steps}")
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its least package
                walk(nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def test_no_package_imports_one_above_it() -> None:
    found = violations(PACKAGE)
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_no_import_cycles_between_packages() -> None:
    found = cycles(PACKAGE)
    shown = found[:10] + ([f"… and {len(found) - 10} more"] if len(found) > 10 else [])
    assert not found, "import cycles:\n" + "\n".join(shown)


def test_the_checks_catch_violations(tmp_path: Path) -> None:
    """A made-up package with an upward import (function-local and relative) and a cycle."""
    root = tmp_path / "constitutional"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/io.py": "def f():\n    from ..rl import label\n",
        "rl/__init__.py": "",
        "rl/label.py": "from constitutional.core import io\nimport constitutional.evaluate.mc\n",
        "evaluate/__init__.py": "",
        "evaluate/mc.py": "from constitutional.rl.label import x\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    found = violations(root)
    assert any("constitutional/core/io.py:2: core imports constitutional.rl.label" in v
               for v in found), found
    assert any("constitutional/rl/label.py:2: rl imports constitutional.evaluate.mc" in v
               for v in found), found
    assert any("evaluate imports constitutional.rl.label" in v for v in found), found
    loops = cycles(root)
    assert any(c.startswith("cycle core → rl → core") for c in loops), loops
    assert any(c.startswith("cycle evaluate → rl → evaluate") for c in loops), loops
