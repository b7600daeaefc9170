"""Plumbing shared by the generic steps: the study folder, its records, the options, error printing.

A study folder (default ``results/<task>/<model>/<settings>``, ``…_test`` for ``--test``) holds::

    metadata.json            # step 1: task, model, settings, seed, filter report per dataset; step 2: experiments
    datasets/<family>/       # step 1: filtered counterfactual datasets (HF save_to_disk)
    raw/<experiment>/        # step 2: raw intervention results (manifest + parquet)
    scores/                  # step 3: scores, heatmaps, summary.md
    analyses/<extra step>/   # the task's extra steps (run by the study runner, experiments.study)
    report.md                # step 4: the task's report sections, then the scores summary

Imports no torch (``--help`` and step 3 stay instant); the pipeline is loaded by the steps that need it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from causal.counterfactual_dataset import CounterfactualDataset
from causal.results import atomic_write_json
from experiments.task import Task, get_task, known_tasks

ORGANISM = "organism"
"""``--model organism`` is the task's shipped model organism (the default)."""

def model_path(task: Task, model: str) -> str:
    """A hub name or local folder; ``organism`` means the task's shipped checkpoint."""
    if model == ORGANISM:
        if task.organism is None:
            raise ValueError(f"task {task.name!r} ships no model organism: pass --model")
        return str(task.organism)
    return model


def settings_fields(task: Task) -> dict[str, Any]:
    """The task settings' fields (name -> pydantic FieldInfo), each becomes a ``--name`` option."""
    return dict(task.settings.model_fields)


def task_settings(task: Task, args: argparse.Namespace) -> Any:
    """The validated settings record of ``task`` from parsed options (a ValueError names a bad value)."""
    return task.settings(**{name: getattr(args, name) for name in settings_fields(task)})


DEVICE_PATTERN = re.compile(r"(cpu|mps|(cuda|xpu)(:\d+)?)")


def device_name(value: str) -> str:
    """``--device``: cpu, mps, cuda or xpu (optionally ``:N``); anything else is refused by argparse in one line."""
    if not DEVICE_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(f"unknown device {value!r}: use cpu, cuda, cuda:N, mps or xpu")
    return value


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def study_parser(task: Task, description: str | None, step: int | None = None,
                 prog: str | None = None) -> argparse.ArgumentParser:
    """The options of step ``step`` (1 or 2; None: both, as a run-all script passes) for ``task``.

    Every step parser accepts the other step's options too, so one argument list can go to both;
    ``--help`` lists only the step's own (the others are accepted and ignored).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=ORGANISM,
                        help="hub name (e.g. meta-llama/Llama-3.1-8B-Instruct) or local HF folder; default: the shipped organism")
    for name, info in settings_fields(task).items():
        option = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"default": info.default, "dest": name, "help": info.description or f"task setting {name}"}
        if name in ("template", "format") and task.prompt_formats:
            kwargs["choices"] = sorted(task.prompt_formats)
        elif isinstance(info.default, bool):
            kwargs["action"] = "store_true"
        elif isinstance(info.default, (int, float)):
            kwargs["type"] = type(info.default)
        parser.add_argument(option, **kwargs)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"study folder (default results/{task.results_name or task.name}/<model>/<settings>, "
                             f"…_test with --test)")
    parser.add_argument("--device", default=None, type=device_name,
                        help="cpu, cuda, cuda:1, mps … (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--test", action="store_true", help="tiny, fast run (smoke test)")
    add_debug_option(parser)

    def group(own: int, title: str) -> Any:
        shown = step is None or step == own
        target = parser.add_argument_group(title) if shown else parser
        return target, (lambda text: text) if shown else (lambda text: argparse.SUPPRESS)

    step1, help1 = group(1, "step 1 (datasets)")
    step1.add_argument("--size", type=int, default=128, help=help1("pairs sampled per dataset family (before filtering)"))
    step1.add_argument("--seed", type=int, default=0, help=help1("sampling seed"))
    step1.add_argument("--families", nargs="*", default=None, help=help1("dataset families (default: all)"))
    step2, help2 = group(2, "step 2 (interventions)")
    step2.add_argument("--batch-size", type=int, default=64, help=help2("pairs per part (results file, resume unit)"))
    step2.add_argument("--max-rows", type=int, default=1024, help=help2("cells × pairs folded into one forward"))
    step2.add_argument("--layers", type=int, nargs="*", default=None, help=help2("layers (default: all; -1 = embeddings)"))
    step2.add_argument("--no-heads", action="store_true", help=help2("skip the attention-head sweep"))
    step2.add_argument("--backend", default="hooks", choices=("hooks", "pyvene"),
                       help=help2("how interventions reach into the model: plain torch hooks (default) or pyvene"))
    step2.add_argument("--pack-sites", action="store_true",
                       help=help2("cells of different sites share forwards (hooks backend; fewer forwards, the same "
                                  "answers; recorded in the results' identity)"))
    step2.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                       help=help2("run only shard I of N (every N-th unit: a part, or a cell range of one) into "
                                  "raw/shards/<sweep>/I-of-N"))
    step2.add_argument("--cell-blocks", type=int, default=None, metavar="M",
                       help=help2("with --shard: split each part's cells into M ranges (default: ceil(N / parts))"))
    step2.add_argument("--restart", action="store_true",
                       help=help2("discard each sweep's existing raw results (e.g. after its manifest was lost) and "
                                  "start over"))
    step2.add_argument("--merge-shards", type=int, default=None, metavar="N",
                       help=help2("merge the N finished shards of each sweep into raw/<sweep> (no model needed)"))
    return parser


def _shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` (the fleet module is imported lazily: parsing stays torch-free)."""
    from experiments.engine.fleet import parse_shard

    return parse_shard(text)


def default_study_dir(task: Task, model: str, settings: Any, test: bool = False) -> Path:
    """``results/<task>/<model>/<settings slug>`` (``…_test`` for ``--test`` runs, which never touch a full study)."""
    slug = ORGANISM if model == ORGANISM else re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/"))
    if task.study_slug is not None:
        name = task.study_slug(settings)
    else:
        name = "_".join(f"{k}-{v}" for k, v in settings.model_dump().items()) or "default"
    return Path("results") / (task.results_name or task.name) / slug / f"{name}{'_test' if test else ''}"


def study_dir(task: Task, args: argparse.Namespace) -> Path:
    return args.out if args.out is not None else default_study_dir(task, args.model, task_settings(task, args), args.test)


def step1_settings(task: Task) -> tuple[str, ...]:
    """Settings of step 1 that step 2 must share: the datasets were filtered by this model on these prompts."""
    return ("model", "chat", *settings_fields(task))


def check_same_study(args: argparse.Namespace, metadata: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse arguments that contradict the datasets step 1 wrote into this study folder."""
    differ = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (step 1 used {metadata.get(k)!r})"
              for k in keys if getattr(args, k) != metadata.get(k)]
    if differ:
        raise SystemExit(
            "these arguments differ from the ones that built the datasets in this study folder: " + "; ".join(differ)
            + ". Rerun step 1 with them, or pass the same arguments (or another --out)."
        )


def load_pipeline(task: Task, args: argparse.Namespace):
    """The LMPipeline for ``args`` (imports torch; step 3 never calls this)."""
    from experiments.pipeline import LMPipeline

    return LMPipeline(model_path(task, args.model), max_new_tokens=task.max_new_tokens(task_settings(task, args)),
                      device=args.device, dtype=args.dtype, use_chat_template=args.chat)


def write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    atomic_write_json(folder / "metadata.json", metadata)


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / "metadata.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run step 1 (generate and filter datasets) first")
    return json.loads(path.read_text())


def load_datasets(folder: Path) -> dict[str, CounterfactualDataset]:
    """The filtered datasets saved by step 1, in the order recorded in metadata.json."""
    metadata = read_metadata(folder)
    return {name: CounterfactualDataset.load(folder / "datasets" / name) for name in metadata["datasets"]}


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by the arguments or the files they name (printed as one line, no traceback):
    ValueError (incl. ModelLoadError, UnitError, TokenPositionError, PromptError, pydantic validation),
    ResultsError and FileNotFoundError."""
    from causal.results import ResultsError

    return (ValueError, ResultsError, FileNotFoundError)


def run_step(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a step's ``main``; any error becomes one line on stderr and exit status 1 (``--debug``: the traceback).

    Returns the exit status (0 on success) for ``sys.exit``.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except user_error_types() as exc:
        if "--debug" in argv:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message} ({type(exc).__name__}; --debug shows the traceback)", file=sys.stderr)
        return 1
    except Exception as exc:  # a crash inside the step: still one line, the traceback behind --debug
        if "--debug" in argv:
            raise
        message = " ".join(str(exc).split()) or "(no message)"
        print(f"error: {type(exc).__name__}: {message} (an internal error; rerun with --debug for the traceback "
              f"and report it)", file=sys.stderr)
        return 1
    return 0


def split_task(argv: list[str] | None, task: str | None) -> tuple[Task, list[str]]:
    """The task (from ``task`` or a ``--task NAME`` option) and the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if task is None:
        if "--task" not in argv and ("-h" in argv or "--help" in argv):
            print(f"usage: python -m {sys.argv[0]} --task NAME [options]; --task NAME --help lists a task's options.\n"
                  f"known tasks: {', '.join(known_tasks())}")
            raise SystemExit(0)
        if "--task" not in argv or argv.index("--task") == len(argv) - 1:
            raise ValueError(f"pass --task NAME (known tasks: {', '.join(known_tasks())})")
        at = argv.index("--task")
        task = argv[at + 1]
        argv = argv[:at] + argv[at + 2:]
    return get_task(task), argv


if __name__ == "__main__":  # print the study folder for a set of step arguments (used by run-all scripts)
    chosen, rest = split_task(None, None)
    print(study_dir(chosen, study_parser(chosen, None).parse_args(rest)))
