"""The study runner: every task's study, in one process, through the same steps into the same folder layout.

    python -m experiments.study --task general_addition [--test] [--digits 3] [--model M --device cuda] ...
    python -m experiments.study --task decimal_comparison --steps filter bug_rate     # a subset of the steps
    python -m experiments.study --task path/to/my_task --test

Runs filter → intervene → score → report (the generic steps of ``experiments.steps``, each its own ``main``), with
the task's extra steps (``Task.extra_steps``) after the standard step each names. ``--steps`` runs a subset, in the
study's order. Every run resumes: step 1 is skipped when the study folder holds its datasets made with the same
options (``--redo filter`` refilters), step 2 keeps finished parts, an extra step that finished with the same
options on the same datasets is skipped (``--redo NAME`` reruns it).

The study folder (``results/<task>/<model>/<settings>``, ``…_test`` with ``--test``, or ``--out``)::

    metadata.json       # step 1: task, model, settings, filter report per dataset; step 2: experiments
    datasets/<family>/  # step 1
    raw/<experiment>/   # step 2 (and extra steps that record engine-format results for step 3)
    scores/             # step 3: scores and verdicts per hypothesis, heatmaps, summary.md
    analyses/<step>/    # the task's extra steps (their data, figures, records)
    report.md           # step 4: the task's report sections, then the scores summary

Options: those of steps 1 and 2 (``--model``, ``--test``, ``--out``, the task's settings, ``--size``, ``--layers`` …),
step 3's (``--target-vars``, ``--hypotheses``, ``--include-pairs``) and the task's extra steps' own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from experiments.steps import filter as filter_step
from experiments.steps import intervene as intervene_step
from experiments.steps import report as report_step
from experiments.steps import score as score_step
from experiments.steps.common import (
    read_metadata,
    run_step,
    split_task,
    step1_settings,
    study_dir,
    study_parser,
    task_settings,
)
from experiments.task import STANDARD_STEPS, ExtraStep, StudyContext, Task

DONE_NAME = "step.json"
"""The record an extra step leaves in ``analyses/<name>/`` when it finishes."""


def step_order(task: Task) -> list[str]:
    """The study's steps in order: each standard step followed by the extra steps declared after it."""
    order: list[str] = []
    for step in STANDARD_STEPS:
        order.append(step)
        order += [extra.name for extra in task.extra_steps if extra.after == step]
    return order


def _add_runner_options(parser: Any, task: Task) -> None:
    """The runner's own options and step 3's; plus each extra step's options in a group of its own."""
    order = step_order(task)
    runner = parser.add_argument_group("study runner")
    runner.add_argument("--steps", nargs="+", choices=order, default=None, metavar="STEP",
                        help=f"run only these steps, in the study's order (default: all: {' '.join(order)})")
    runner.add_argument("--redo", nargs="+", choices=["filter", *(e.name for e in task.extra_steps)], default=[],
                        metavar="STEP", help="rerun these steps although their records say they are done")
    score = parser.add_argument_group("step 3 (scores)")
    score.add_argument("--target-vars", nargs="*", default=None,
                       help="variables to score, one group each (default: the task's targets)")
    score.add_argument("--hypotheses", nargs="+", default=None, metavar="NAME",
                       help="causal models to score, the first as the main one (default: all)")
    score.add_argument("--include-pairs", action="store_true", help="also score every pair of targets jointly")
    for extra in task.extra_steps:
        if extra.options is not None:
            extra.options(parser.add_argument_group(f"extra step {extra.name}" + (f" ({extra.description})"
                                                                                  if extra.description else "")))


def runner_parser(task: Task, prog: str | None = None) -> argparse.ArgumentParser:
    """Every option of a study run (``--help`` lists them)."""
    parser = study_parser(task, __doc__, step=None, prog=prog)
    parser.allow_abbrev = False
    _add_runner_options(parser, task)
    return parser


def _own_parser(task: Task) -> argparse.ArgumentParser:
    """Only the options that the generic steps 1 and 2 do not take (split off before calling them)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_runner_options(parser, task)
    return parser


CONTROL_OPTIONS = frozenset({"steps", "redo", "debug", "target_vars", "hypotheses", "include_pairs", "device", "out",
                             "restart", "shard", "cell_blocks", "merge_shards"})
"""Options that say what to run or where, not what is computed: left out of an extra step's identity."""


def _identity(extra: ExtraStep, context: StudyContext) -> dict[str, Any]:
    """What makes a finished extra step reusable: every option that can change what it computes (the study's
    settings, model and sizes, the engine options and every extra step's options; conservative: an extra step reads
    any of them), and the study's datasets (and, after step 2, the experiments it recorded)."""
    metadata = context.metadata()
    options = {k: v for k, v in sorted(vars(context.options).items()) if k not in CONTROL_OPTIONS}
    return json.loads(json.dumps({
        "step": extra.name, "options": options, "datasets": metadata.get("datasets"), "filter": metadata.get("filter"),
        "experiments": [e.get("id") for e in metadata.get("experiments", [])] if extra.after != "filter" else None,
    }, default=str))


def filter_is_done(task: Task, args: argparse.Namespace, folder: Path) -> bool:
    """Step 1 already wrote this study's datasets with the same options."""
    if not (folder / "metadata.json").exists():
        return False
    metadata = read_metadata(folder)
    keys = (*step1_settings(task), "seed", "size", "families", "test")
    if any(getattr(args, k) != metadata.get(k) for k in keys) or metadata.get("task", task.name) != task.name:
        return False
    return all((folder / "datasets" / name).exists() for name in metadata.get("datasets", []))


def run_extra(extra: ExtraStep, context: StudyContext, redo: bool) -> None:
    record = context.folder / "analyses" / extra.name / DONE_NAME
    identity = _identity(extra, context)
    if not redo and record.exists() and json.loads(record.read_text()) == identity:
        print(f"{extra.name}: done with the same options and datasets; skipped (--redo {extra.name} reruns it)")
        return
    extra.run(context)
    from causal.results import atomic_write_json

    atomic_write_json(context.analysis_dir(extra.name) / DONE_NAME, _identity(extra, context))


def _score_options(own: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if own.target_vars:
        out += ["--target-vars", *own.target_vars]
    if own.hypotheses:
        out += ["--hypotheses", *own.hypotheses]
    if own.include_pairs:
        out.append("--include-pairs")
    return out


def main(argv: list[str] | None = None, task: str | None = None) -> Path:
    """Run the study's steps (all, or ``--steps``); returns the study folder."""
    chosen, rest = split_task(argv, task)
    args = runner_parser(chosen, prog="python -m experiments.study").parse_args(rest)
    own, step_argv = _own_parser(chosen).parse_known_args(rest)
    folder = study_dir(chosen, args)
    settings = task_settings(chosen, args)
    context = StudyContext(chosen, folder, settings, args)
    order = step_order(chosen)
    chosen_steps = [step for step in order if args.steps is None or step in args.steps]
    extras = {extra.name: extra for extra in chosen.extra_steps}
    name = chosen.name
    print(f"study of {name!r} in {folder}: {' → '.join(chosen_steps)}", flush=True)
    for step in chosen_steps:
        print(f"\n== {step} ==", flush=True)
        if step == "filter":
            if "filter" not in args.redo and filter_is_done(chosen, args, folder):
                print(f"datasets of this study are in {folder / 'datasets'} (same options); skipped "
                      f"(--redo filter refilters)")
            else:
                filter_step.main(step_argv, task=name)
        elif step == "intervene":
            intervene_step.main(step_argv, task=name)
        elif step == "score":
            if chosen.sweeps is None and not read_metadata(folder).get("experiments"):
                print("no experiment recorded (the task declares no sweeps and no extra step recorded raw results): "
                      "nothing to score")
                continue
            score_step.main([*step_argv, *_score_options(own)], task=name)
        elif step == "report":
            scores = score_step.scores_folder_name(own.target_vars, own.include_pairs, own.hypotheses)
            print(f"report written to {report_step.write_report(context, scores)}")
        else:
            run_extra(extras[step], context, redo=step in args.redo)
    print(f"\nstudy folder: {folder}" + (f"; report: {folder / report_step.REPORT_NAME}"
                                          if (folder / report_step.REPORT_NAME).exists() else ""))
    return folder


if __name__ == "__main__":
    sys.exit(run_step(main))
