"""What an analysis needs from a task, as one record a task package declares in ``tasks/<name>/analysis.py``.

``ANALYSIS = TaskAnalysis(...)`` there; :func:`load_task_analysis` finds it. Settings are the task's input
dicts (with ``raw_input``); token indices are unpadded (0 = first token, BOS included).
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from experiments.pipeline import LMPipeline

Setting = dict[str, Any]


@dataclass(frozen=True)
class TaskAnalysis:
    """Task-specific pieces of the analyses.

    - ``parse_example(text) -> setting`` (e.g. ``"59+73"``); ``sample(n, seed) -> [setting]``;
    - ``answer(setting) -> str`` (the expected output) and ``check(output_text, setting) -> bool``;
    - ``positions(pipeline, setting) -> {name: token index}``: named single-token positions, prompt order;
    - ``roles(pipeline, setting) -> {role: [token index, …]}``: token sets such as "operator" or
      "carry_digits" (empty when the role is absent in that prompt);
    - ``labels(settings, variable) -> [int]``: a causal-model variable's value per setting;
    - ``probe_variables``: variables probed by default; ``class_variable``: labels for neuron separation;
    - ``corrupt(setting, rng) -> setting``: same token count, different answer (activation patching);
    - ``max_new_tokens``: enough tokens for any answer (+ EOS).
    """

    name: str
    parse_example: Callable[[str], Setting]
    sample: Callable[[int, int], list[Setting]]
    answer: Callable[[Setting], str]
    check: Callable[[str, Setting], bool]
    positions: Callable[[LMPipeline, Setting], dict[str, int]]
    roles: Callable[[LMPipeline, Setting], dict[str, list[int]]]
    labels: Callable[[Sequence[Setting], str], list[int]]
    corrupt: Callable[[Setting, random.Random], Setting]
    probe_variables: tuple[str, ...]
    class_variable: str
    max_new_tokens: int
    organism: Any = None


def load_task_analysis(name: str) -> TaskAnalysis:
    """``ANALYSIS`` of ``tasks.<name>.analysis``; ValueError naming the tasks that have one."""
    try:
        module = importlib.import_module(f"tasks.{name}.analysis")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"tasks.{name}", f"tasks.{name}.analysis", "tasks"):
            raise
        from pathlib import Path

        root = Path(__file__).resolve().parents[2] / "tasks"
        known = sorted(p.parent.name for p in root.glob("*/analysis.py"))
        raise ValueError(f"task {name!r} has no analysis helpers (tasks/{name}/analysis.py); "
                         f"tasks with them: {', '.join(known) or 'none'}") from exc
    spec = getattr(module, "ANALYSIS", None)
    if not isinstance(spec, TaskAnalysis):
        raise ValueError(f"tasks.{name}.analysis defines no ANALYSIS record")
    return spec
