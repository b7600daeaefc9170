"""The ``Task`` record: everything the generic step runners need to know about one study.

A task folder declares one ``Task`` in its ``task.py`` as ``TASK``; it can live in this repository
(``tasks/<name>/``, ``--task <name>``) or anywhere (``--task path/to/folder``, ``--task module:ATTR``, or an
installed entry point of group ``causal_abstraction.tasks``: see `get_task`). The
generic steps (filter → intervene → score → report, ``experiments/steps/``) and the study runner that runs them
(``python -m experiments.study``) take ``--task <name>`` and never import a particular task. This module imports no torch: step 3 (scoring) runs without it, so
everything network-side (token positions, sweeps) is a callable that receives a pipeline.

Required fields (``s`` is the task's pydantic settings, e.g. the number of digits and the prompt format):
- ``causal_models(s) -> {name: CausalModel}``: the main hypothesis first, then its competitors;
- ``make_datasets(s, families, size, seed) -> {id: CounterfactualDataset}`` (the sampler);
- ``token_positions(pipeline, s) -> [TokenPosition]``.

Fields with defaults:
- ``settings`` (`NoSettings`), ``families(s) -> [family]`` (``["random"]``), ``description``;
- ``checker(output_text, expected) -> bool`` (`exact_match`);
- ``default_targets(s, position_ids) -> [[variable, …], …]``: what step 3 scores the main hypothesis on (default:
  every computed variable of the main model on its own, `computed_variables`; ``position_ids``: the token
  positions of the study's cells, e.g. ``addend_0`` where a tokenizer puts a whole addend in one token). Every
  other hypothesis is scored on those of them that are its variables, plus its own computed variables that the
  main hypothesis lacks;
- ``sweeps(pipeline, s, positions, config, layers=None, heads=True) -> [InterventionExperiment]``: what
  step 2 runs (`residual_stream_sweep`);
- ``max_new_tokens(s)`` (8); ``prompt_formats``: format name -> template; ``organism``: the shipped model
  folder (the default ``--model``);
-  ``results_name`` (study folders live under ``results/<results_name>``), ``study_slug(s)``
  (the settings part of the folder name), ``summary_extras(scores, s, targets) -> [markdown lines]``
  (task-specific tables for the main hypothesis' residual-stream scores), ``variable_descriptions(s) ->
  {variable: what it is for every input}`` (shown beside the names in verdict tables);
- ``filter_pairs`` (True): step 1 keeps only the pairs the model gets right on every input; False keeps every
  pair and runs no model in step 1 (for studies of inputs the model gets wrong, e.g. a buggy prompt format);
  ``sweeps=None``: the task has no engine sweeps (its interventions run in extra steps);
- ``extra_steps``: `ExtraStep` s (a name, a callable of a `StudyContext`, the standard step it runs after,
  its own options) that the study runner (``python -m experiments.study``) runs beside filter → intervene →
  score → report; ``report_sections``: callables of a `StudyContext` returning markdown lines that the
  report step appends to ``<study>/report.md``.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib import metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

STANDARD_STEPS: tuple[str, ...] = ("filter", "intervene", "score", "report")
"""The study runner's steps, in order; a task's extra steps run after one of them."""


class NoSettings(BaseModel):
    """Settings of a task that has none."""

    model_config = ConfigDict(extra="forbid")


def exact_match(output_text: str, expected: Any) -> bool:
    """The default checker: the output, stripped, equals the label's text, stripped."""
    return output_text.strip() == str(expected).strip()


def residual_stream_sweep(pipeline: Any, s: Any, positions: list[Any], config: dict[str, Any],
                          layers: list[int] | None = None, heads: bool = True) -> list[Any]:
    """The default sweep: the residual stream at every layer (-1 = embeddings) × every token position."""
    from experiments.engine.intervention_experiment import PatchResidualStream

    layers = list(range(-1, pipeline.num_layers)) if layers is None else list(layers)
    return [PatchResidualStream(pipeline, layers, positions, config={**config, "id": "residual_stream"})]


@dataclass(frozen=True)
class StudyContext:
    """What an extra step or a report section receives: the task, the study folder, its settings and the run's
    options (an ``argparse.Namespace`` holding the options of steps 1 and 2 and of the task's extra steps).

    Everything is read from disk on demand: a report section can run long after the steps that wrote its data."""

    task: "Task"
    folder: Path
    settings: Any
    options: Any

    @property
    def test(self) -> bool:
        """A ``--test`` run (extra steps use their smallest sizes)."""
        return bool(getattr(self.options, "test", False))

    @property
    def restart(self) -> bool:
        """``--restart``: steps that write raw results discard what their folders hold and start over."""
        return bool(getattr(self.options, "restart", False))

    @property
    def model(self) -> str:
        """``--model`` (``organism``: the task's shipped model)."""
        return str(getattr(self.options, "model", None) or self.metadata().get("model", "organism"))

    def model_path(self) -> str:
        """The local folder or hub name of the model (the task's organism for ``organism``)."""
        if self.model == "organism":
            if self.task.organism is None:
                raise ValueError(f"task {self.task.name!r} ships no model organism: pass --model")
            return str(self.task.organism)
        return self.model

    def metadata(self) -> dict[str, Any]:
        """The study's metadata.json (``{}`` before step 1)."""
        import json

        path = self.folder / "metadata.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def analysis_dir(self, name: str) -> Path:
        """``<study>/analyses/<name>/``: where the extra step ``name`` writes (created on demand)."""
        folder = self.folder / "analyses" / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def datasets(self) -> dict[str, Any]:
        """The datasets step 1 saved, in its order."""
        from experiments.steps.common import load_datasets

        return load_datasets(self.folder)

    def load_pipeline(self) -> Any:
        """An ``LMPipeline`` of the study's model (imports torch)."""
        from experiments.pipeline import LMPipeline

        return LMPipeline(self.model_path(), max_new_tokens=self.task.max_new_tokens(self.settings),
                          device=getattr(self.options, "device", None), dtype=getattr(self.options, "dtype", None),
                          use_chat_template=bool(getattr(self.options, "chat", False)))


@dataclass(frozen=True)
class ExtraStep:
    """A task-specific step the study runner runs after the standard step ``after`` (``filter``, ``intervene``,
    ``score`` or ``report``). ``run(context)`` writes under ``context.analysis_dir(name)`` (or records raw
    results in the study's metadata for step 3 to score); ``options(parser)`` adds its ``--options`` to the
    runner. A finished run is recorded, and a rerun with the same options and datasets skips it (``--redo``)."""

    name: str
    run: Callable[[StudyContext], Any]
    after: str = "intervene"
    description: str = ""
    options: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if self.after not in STANDARD_STEPS:
            raise ValueError(f"extra step {self.name!r}: after must be one of {', '.join(STANDARD_STEPS)}, "
                             f"got {self.after!r}")
        if self.name in STANDARD_STEPS:
            raise ValueError(f"extra step {self.name!r} has the name of a standard step")


ReportSection = Callable[[StudyContext], list[str]]
"""A report section: markdown lines for ``report.md``, computed from the study folder (no model)."""


@dataclass(frozen=True)
class Task:
    """One study. Required: ``name``, ``causal_models``, ``make_datasets`` (the sampler) and
    ``token_positions``; everything else has a default (no settings, one family ``"random"``, exact-match
    checker, every non-input variable of the main hypothesis as its own target, the residual-stream sweep,
    8 new tokens)."""

    name: str
    causal_models: Callable[[Any], dict[str, Any]]
    make_datasets: Callable[..., dict[str, Any]]
    token_positions: Callable[[Any, Any], list[Any]]
    description: str = ""
    settings: type[BaseModel] = NoSettings
    families: Callable[[Any], list[str]] = lambda s: ["random"]
    checker: Callable[[str, Any], bool] = exact_match
    default_targets: Callable[..., list[list[str]]] | None = None
    sweeps: Callable[..., list[Any]] | None = residual_stream_sweep
    max_new_tokens: Callable[[Any], int] = lambda s: 8
    prompt_formats: dict[str, str] = field(default_factory=dict)
    organism: Path | None = None
    results_name: str | None = None
    study_slug: Callable[[Any], str] | None = None
    summary_extras: Callable[..., list[str]] | None = None
    variable_descriptions: Callable[[Any], dict[str, str]] | None = None
    filter_pairs: bool = True
    extra_steps: tuple[ExtraStep, ...] = ()
    report_sections: tuple[ReportSection, ...] = ()

    def __post_init__(self) -> None:
        if self.default_targets is None:
            object.__setattr__(self, "default_targets", self._every_computed_variable)
        names = [step.name for step in self.extra_steps]
        if len(set(names)) != len(names):
            raise ValueError(f"task {self.name!r}: two extra steps share a name ({', '.join(names)})")

    def _every_computed_variable(self, s: Any, positions_per: Any = None) -> list[list[str]]:
        return [[v] for v in computed_variables(self.main_model(s))]

    def main_model(self, settings: Any) -> Any:
        """The main hypothesis (the first causal model)."""
        return next(iter(self.causal_models(settings).values()))


def computed_variables(model: Any) -> list[str]:
    """A causal model's variables that a network could hold and an interchange can move: every non-input variable
    except ``raw_input`` (the prompt; no answer depends on it)."""
    return [v for v in model.variables if v not in model.inputs and v != "raw_input"]


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` available to ``get_task(task.name)`` (idempotent for the same record)."""
    existing = _REGISTRY.get(task.name)
    if existing is not None and existing is not task:
        raise ValueError(f"a different task is already registered as {task.name!r}")
    _REGISTRY[task.name] = task
    return task


ENTRY_POINT_GROUP = "causal_abstraction.tasks"


def get_task(name: str) -> Task:
    """The task that ``name`` names, looked up in this order:

    - a registered task (`register_task`);
    - a folder holding ``task.py`` (e.g. ``~/my_study/carry_task``), or that ``task.py`` itself: the folder's
      parent goes on ``sys.path`` so the folder imports as a package (``carry_task.task``, its siblings
      ``carry_task.causal_models`` …), and its ``TASK`` is used;
    - ``module:ATTR`` or a dotted module path (``mypackage.addition_task``, ``TASK`` inside);
    - an installed entry point of group ``causal_abstraction.tasks`` with that name;
    - ``tasks.<name>.task`` of this repository."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    path = Path(name).expanduser()
    if name.endswith(".py") or os.sep in name or path.is_dir():
        folder = path.parent if path.suffix == ".py" else path
        if not (folder / "task.py").is_file():
            raise ValueError(f"task {name!r}: {folder} holds no task.py")
        if str(folder.resolve().parent) not in sys.path:
            sys.path.insert(0, str(folder.resolve().parent))
        return _task_of(f"{folder.resolve().name}.task", "TASK")
    if ":" in name:
        module, attr = name.split(":", 1)
        return _task_of(module, attr)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            task = entry.load()
            if not isinstance(task, Task):
                raise ValueError(f"entry point {name!r} ({entry.value}) is not a Task record")
            return register_task(task)
    if "." in name:
        return _task_of(name, "TASK")
    try:
        return _task_of(f"tasks.{name}.task", "TASK")
    except TaskNotFound as exc:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(known_tasks()) or 'none'} (or pass a folder "
                         f"holding task.py, a module path, or module:ATTR)") from exc


class TaskNotFound(ValueError):
    """No module of that name (the task's own failing imports are raised as they are)."""


def _task_of(module_name: str, attr: str) -> Task:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise TaskNotFound(f"no module {module_name!r}") from exc
        raise
    task = getattr(module, attr, None)
    if not isinstance(task, Task):
        raise ValueError(f"{module_name} defines no Task record {attr}")
    return register_task(task)


def known_tasks() -> list[str]:
    """Task packages that declare a ``task.py`` (found on disk; nothing imported)."""
    root = Path(__file__).resolve().parents[1] / "tasks"
    return sorted(p.parent.name for p in root.glob("*/task.py"))
