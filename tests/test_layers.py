"""The package's layers import only downward: study → eval / coconut → cli → run → rl → rollout → data →
prompts / distributed → models → config (README, "Layout"). Read from the source with ``ast``, lazy imports
included, so a new upward import fails here rather than in a newcomer's head."""

from __future__ import annotations

import ast
from pathlib import Path

import thinkrl

PACKAGE = Path(thinkrl.__file__).resolve().parent

# Higher number = higher layer. Modules on the same floor may import each other.
LAYER = {
    "study": 9,
    "eval": 8,
    "coconut": 8,
    "export": 8,
    "serve": 8,
    "plan": 8,
    "cli": 7,
    "run": 6,
    "rl": 5,
    "rollout": 4,
    "data": 3,
    "prompts": 2,
    "distributed": 2,
    "models": 1,
    "config": 0,
    "errors": 0,
    "timing": 0,
    "output_folder": 0,
}


def _unit(module: str) -> str:
    """``thinkrl.run.trainer`` → ``run``; ``thinkrl`` itself → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("thinkrl"):
            if node.module == "thinkrl":
                found += [(node.lineno, f"thinkrl.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("thinkrl.")]
    return found


def test_every_package_module_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("__")}
    units = {u for u in units if (PACKAGE / u).is_dir() or (PACKAGE / f"{u}.py").is_file()}
    assert units == set(LAYER), f"give these a floor in LAYER and README's Layout: {sorted(units ^ set(LAYER))}"


def test_no_module_imports_a_layer_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        own = _unit(".".join(rel.parts))
        if own not in LAYER:
            continue  # thinkrl/__init__.py, __main__.py
        for line, module in _imports(path):
            target = _unit(module)
            if target and LAYER[target] > LAYER[own]:
                upward.append(f"{rel}.py:{line} imports {module}")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    # The test above must be able to fail: a models module importing run is found.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from thinkrl.run.trainer import Trainer\n", encoding="utf-8")
    assert _imports(probe) == [(2, "thinkrl.run.trainer")]
    assert LAYER[_unit("thinkrl.run.trainer")] > LAYER["models"]
