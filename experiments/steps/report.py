"""Step 4: ``<study>/report.md``, the score step's summary plus the report sections the task declares.

    python -m experiments.steps.report --task decimal_comparison [--test] [task settings]   # the study of steps 1-3
    python -m experiments.steps.report --task decimal_comparison --results results/decimal/organism/qa_from_simple

The report opens with the task's sections (``Task.report_sections``: task-specific tables computed from the study
folder, e.g. the decimal study's bug rate per format, or the continuous-thought error taxonomy), then the scores
summary of step 3 (``scores/summary.md``, or ``--scores scores_<…>`` for a partial scoring run). Needs no model
and imports no torch unless a section does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from causal.results import atomic_write_bytes
from experiments.steps.common import add_debug_option, read_metadata, run_step, split_task, study_dir, study_parser
from experiments.task import StudyContext, Task

REPORT_NAME = "report.md"


def settings_of(task: Task, metadata: dict[str, Any]) -> Any:
    """The task settings recorded by step 1."""
    return task.settings(**{k: metadata[k] for k in task.settings.model_fields if k in metadata})


def write_report(context: StudyContext, scores: str = "scores") -> Path:
    """Write ``<study>/report.md``; returns its path. A section that fails is reported in its place (one line) and
    the report is still written."""
    task, folder = context.task, context.folder
    metadata = read_metadata(folder)
    described = ", ".join(f"{k} {v}" for k, v in context.settings.model_dump().items())
    lines = [f"# {task.name} study: {metadata.get('model')}" + (f" ({described})" if described else ""), ""]
    if task.description:
        lines += [task.description, ""]
    held = [f"`{name}`" for name in ("metadata.json", "datasets/", "raw/", f"{scores}/", "analyses/")
            if (folder / name.rstrip("/")).exists()]
    lines += [f"Study folder `{folder}`: {', '.join(held)} and this report.", ""]
    for section in task.report_sections:
        try:
            body = section(context)
        except FileNotFoundError as exc:  # its data was not computed (a step not run): say so and go on
            body = [f"## {_title(section)}: not available", "", " ".join(str(exc).split())]
        lines += [*body, ""] if body else []
    summary = folder / scores / "summary.md"
    if summary.exists():
        text = summary.read_text().splitlines()
        start = next((i for i, line in enumerate(text) if line.startswith("## ")), len(text))  # after its title
        lines += ["## Scores (step 3)", "", *[("#" + line if line.startswith("#") else line) for line in text[start:]]]
    else:
        lines += ["## Scores (step 3)", "", f"No `{scores}/summary.md`: the score step has not run on this study."]
    out = folder / REPORT_NAME
    atomic_write_bytes(out, ("\n".join(lines).rstrip() + "\n").encode())
    return out


def _title(section: Any) -> str:
    name = getattr(section, "__name__", "section")
    return name.removesuffix("_section").replace("_", " ").strip().capitalize()


def main(argv: list[str] | None = None, task: str | None = None) -> Path:
    chosen, rest = split_task(argv, task)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=None,
                        help="study folder (default: the one steps 1-3 write with the same options as here)")
    parser.add_argument("--scores", default="scores", help="the scores folder to summarise (default: scores)")
    add_debug_option(parser)
    args, others = parser.parse_known_args(rest)
    options = study_parser(chosen, None, prog=parser.prog).parse_args(others if args.results is None else [])
    if args.results is not None and others:
        parser.error(f"unrecognized arguments: {' '.join(others)}")
    folder = args.results if args.results is not None else study_dir(chosen, options)
    metadata = read_metadata(folder)
    if metadata.get("task", chosen.name) != chosen.name:
        raise ValueError(f"{folder} holds a study of task {metadata['task']!r}, not {chosen.name!r}")
    if args.results is not None:
        options.model = metadata.get("model", options.model)
        options.test = bool(metadata.get("test", False))
    out = write_report(StudyContext(chosen, folder, settings_of(chosen, metadata), options), args.scores)
    print(f"report written to {out}")
    return out


if __name__ == "__main__":
    sys.exit(run_step(main))
