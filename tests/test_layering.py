"""The house rules, read off the source: only the backends reach into a network (install hooks, import pyvene),
nothing asks which backend it has, and the arrows point one way (tasks -> experiments -> causal)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("causal", "experiments", "tasks", "scripts", "demos", "benchmarks")
BACKENDS = {"experiments/backends/hooks_backend.py", "experiments/backends/pyvene_backend.py"}
HOOK_CALLS = re.compile(r"\.(register_forward_hook|register_forward_pre_hook|register_full_backward_hook|"
                        r"register_full_backward_pre_hook|register_hook)\(|\bregister_site_hook\b")
#: The plain-hook baseline a speed ratio is measured against (an honest reference, on purpose outside the engine).
HOOK_BASELINES = {"benchmarks/patching_sweep.py"}
#: pyvene's own training loop, the reference of the DAS speed benchmark.
PYVENE_BASELINES = {"benchmarks/das_training.py", "benchmarks/patching_sweep.py"}


def sources() -> list[tuple[str, str]]:
    out = []
    for folder in SHIPPED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            out.append((rel, path.read_text()))
    return out


def imported_modules(text: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_backends_install_hooks():
    offenders = [f"{rel}:{i + 1}" for rel, text in sources() if rel not in BACKENDS | HOOK_BASELINES
                 for i, line in enumerate(text.splitlines()) if HOOK_CALLS.search(line)]
    assert not offenders, f"hooks installed outside the backends (use a backend operation): {offenders}"


def test_only_the_pyvene_backend_imports_pyvene():
    offenders = [rel for rel, text in sources() if rel not in BACKENDS | PYVENE_BASELINES
                 and any(m == "pyvene" or m.startswith("pyvene.") for m in imported_modules(text))]
    assert not offenders, offenders


def test_nothing_asks_which_backend_it_has():
    pattern = re.compile(r"backend\.name\s*[=!]=|\.name\s*==\s*[\"'](hooks|pyvene)[\"']")
    offenders = [rel for rel, text in sources() if rel not in BACKENDS and pattern.search(text)]
    assert not offenders, f"ask backend.operations instead: {offenders}"


def test_arrows_point_one_way():
    """causal imports neither experiments nor tasks; experiments never imports tasks."""
    offenders = []
    for rel, text in sources():
        top = rel.split("/")[0]
        for module in imported_modules(text):
            first = module.split(".")[0]
            if (top == "causal" and first in ("experiments", "tasks")) or (top == "experiments" and first == "tasks"):
                offenders.append(f"{rel} imports {module}")
    assert not offenders, offenders


def test_only_the_backends_run_attention_operations():
    offenders = [f"{rel}:{i + 1}" for rel, text in sources() if rel not in BACKENDS | {"experiments/backends/attention_control.py"}
                 for i, line in enumerate(text.splitlines()) if re.search(r"\battention_control\(", line)]
    assert not offenders, f"use the backend's attention operation: {offenders}"


def test_old_import_paths_warn_and_give_the_moved_module():
    import importlib
    import sys

    import pytest

    from experiments import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new) and module.__spec__.name == new
    assert not any((ROOT / (old.replace(".", "/") + ".py")).exists() for old in MOVED), "no file left at an old path"
