"""The ``Task`` record: everything the generic step runners need to know about one study.

A task package (``tasks/<name>/``) declares one ``Task`` in ``tasks/<name>/task.py`` as ``TASK``; the
generic steps (filter → intervene → score, ``experiments/steps.py``) take ``--task <name>`` and never
import a particular task. This module imports no torch: step 3 (scoring) runs without it, so
everything network-side (token positions, sweeps) is a callable that receives a pipeline.

Fields (``S`` is the task's pydantic settings model, e.g. the number of digits and the prompt format):
- ``causal_models(s) -> {name: CausalModel}``: the main hypothesis first, then its competitors;
- ``families(s) -> [family]`` and ``make_datasets(s, families, size, seed) -> {id: CounterfactualDataset}``;
- ``prompt_formats``: format name -> template (data, in one place);
- ``token_positions(pipeline, s) -> [TokenPosition]``;
- ``checker(output_text, expected) -> bool``;
- ``default_targets(s, positions_per) -> [[variable, …], …]`` (``positions_per``: "digit" or "addend" …
  as the task's token positions report it; tokenizers that chunk several digits get joint targets);
- ``sweeps(pipeline, s, positions, config, layers=None, heads=True) -> [InterventionExperiment]``: what
  step 2 runs (``layers``: restrict to these layers; ``heads``: include head sweeps);
- ``max_new_tokens(s)``; ``organism``: the shipped model folder (the default ``--model``);
- optional: ``results_name`` (study folders live under ``results/<results_name>``), ``study_slug(s)``
  (the settings part of the folder name), ``summary_extras(scores, s, targets) -> [markdown lines]``
  (task-specific tables for the main hypothesis' residual-stream scores), ``variable_descriptions(s) ->
  {variable: what it is for every input}`` (shown beside the names in verdict tables).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    settings: type[BaseModel]
    causal_models: Callable[[Any], dict[str, Any]]
    families: Callable[[Any], list[str]]
    make_datasets: Callable[..., dict[str, Any]]
    token_positions: Callable[[Any, Any], list[Any]]
    checker: Callable[[str, Any], bool]
    default_targets: Callable[..., list[list[str]]]
    sweeps: Callable[..., list[Any]]
    max_new_tokens: Callable[[Any], int]
    prompt_formats: dict[str, str] = field(default_factory=dict)
    organism: Path | None = None
    results_name: str | None = None
    study_slug: Callable[[Any], str] | None = None
    summary_extras: Callable[..., list[str]] | None = None
    variable_descriptions: Callable[[Any], dict[str, str]] | None = None

    def main_model(self, settings: Any) -> Any:
        """The main hypothesis (the first causal model)."""
        return next(iter(self.causal_models(settings).values()))


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` available to ``get_task(task.name)`` (idempotent for the same record)."""
    existing = _REGISTRY.get(task.name)
    if existing is not None and existing is not task:
        raise ValueError(f"a different task is already registered as {task.name!r}")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task called ``name``: registered, or ``TASK`` of the module ``tasks.<name>.task``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    try:
        module = importlib.import_module(f"tasks.{name}.task")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"tasks.{name}", f"tasks.{name}.task", "tasks"):
            raise
        raise ValueError(f"unknown task {name!r}; known: {', '.join(known_tasks()) or 'none'}") from exc
    task = getattr(module, "TASK", None)
    if not isinstance(task, Task):
        raise ValueError(f"tasks.{name}.task defines no TASK record")
    return register_task(task)


def known_tasks() -> list[str]:
    """Task packages that declare a ``task.py`` (found on disk; nothing imported)."""
    root = Path(__file__).resolve().parents[1] / "tasks"
    return sorted(p.parent.name for p in root.glob("*/task.py"))
