"""Shared plumbing of the addition step scripts: where a study lives and how its model is loaded.

A study folder (default ``results/addition/<model>/<D>d``) holds::

    metadata.json            # step 1: model, digits, seed, filter report per dataset
    datasets/<family>/       # step 1: filtered counterfactual datasets (HF save_to_disk)
    raw/<experiment>/        # step 2: raw intervention results (manifest + parquet)
    scores/                  # step 3: scores, heatmaps, summary.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from causal.counterfactual_dataset import CounterfactualDataset
from causal.raw_results import atomic_write_json
from tasks.general_addition.causal_models import DEFAULT_TEMPLATE, PROMPT_TEMPLATES

ORGANISM = "organism"
"""``--model organism`` is the shipped addition model (the default)."""


def model_path(model: str) -> str:
    """A hub name or local folder; ``organism`` means the shipped checkpoint."""
    from tasks.general_addition.organism import ORGANISM_DIR  # imports transformers: not needed for --help

    return str(ORGANISM_DIR) if model == ORGANISM else model


def default_study_dir(model: str, n_digits: int, test: bool = False) -> Path:
    """``results/addition/<model>/<D>d`` (``<D>d_test`` for ``--test`` runs, which never touch a full study)."""
    slug = ORGANISM if model == ORGANISM else re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/"))
    return Path("results") / "addition" / slug / f"{n_digits}d{'_test' if test else ''}"


def study_parser(description: str | None, step: int | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The options of step ``step`` (1 or 2; None: both, as ``run_all.sh`` passes).

    Every step parser accepts the other step's options too, so ``run_all.sh`` passes one argument
    list to both; ``--help`` lists only the step's own (the others are accepted and ignored).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=ORGANISM,
                        help="hub name (e.g. meta-llama/Llama-3.1-8B-Instruct) or local HF folder; default: the shipped organism")
    parser.add_argument("--digits", type=int, default=2, choices=(2, 3, 4), help="digits per addend")
    parser.add_argument("--out", type=Path, default=None,
                        help="study folder (default results/addition/<model>/<D>d, or <D>d_test with --test)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
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
    step1.add_argument("--template", default=DEFAULT_TEMPLATE, choices=sorted(PROMPT_TEMPLATES), help=help1("prompt format"))
    step1.add_argument("--families", nargs="*", default=None, help=help1("dataset families (default: all)"))
    step2, help2 = group(2, "step 2 (interventions)")
    step2.add_argument("--batch-size", type=int, default=64, help=help2("pairs per part (results file, resume unit)"))
    step2.add_argument("--max-rows", type=int, default=1024, help=help2("cells × pairs folded into one forward"))
    step2.add_argument("--layers", type=int, nargs="*", default=None, help=help2("layers (default: all; -1 = embeddings)"))
    step2.add_argument("--no-heads", action="store_true", help=help2("skip the attention-head sweep"))
    step2.add_argument("--backend", default="hooks", choices=("hooks", "pyvene"),
                       help=help2("how interventions reach into the model: plain torch hooks (default) or pyvene"))
    return parser


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by the arguments or the files they name (printed as one line, no traceback):
    ValueError (incl. ModelLoadError, UnitError, TokenPositionError, PromptError, pydantic validation),
    ResultsError and FileNotFoundError."""
    from causal.raw_results import ResultsError

    return (ValueError, ResultsError, FileNotFoundError)


def run_step(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a step's ``main``; a user error becomes one line on stderr and exit status 1 (``--debug``: the traceback).

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
    return 0


def study_dir(args: argparse.Namespace) -> Path:
    return args.out if args.out is not None else default_study_dir(args.model, args.digits, args.test)


STEP1_SETTINGS = ("model", "digits", "chat", "template")
"""Settings of step 1 that step 2 must share: the datasets were filtered by this model on these prompts."""


def check_same_study(args: argparse.Namespace, metadata: dict[str, Any], keys: tuple[str, ...] = STEP1_SETTINGS) -> None:
    """Refuse arguments that contradict the datasets step 1 wrote into this study folder."""
    differ = [f"--{k} {getattr(args, k)!r} (step 1 used {metadata.get(k)!r})"
              for k in keys if getattr(args, k) != metadata.get(k)]
    if differ:
        raise SystemExit(
            "these arguments differ from the ones that built the datasets in this study folder: " + "; ".join(differ)
            + ". Rerun step 1 with them, or pass the same arguments (or another --out)."
        )


def load_pipeline(args: argparse.Namespace):
    """The LMPipeline for ``args`` (imports torch; step 3 never calls this)."""
    from experiments.pipeline import LMPipeline

    return LMPipeline(model_path(args.model), max_new_tokens=args.digits + 2, device=args.device,
                      dtype=args.dtype, use_chat_template=args.chat)


def write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    atomic_write_json(folder / "metadata.json", metadata)


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / "metadata.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run 01_generate_and_filter_dataset.py first")
    return json.loads(path.read_text())


def load_datasets(folder: Path) -> dict[str, CounterfactualDataset]:
    """The filtered datasets saved by step 1, in the order recorded in metadata.json."""
    metadata = read_metadata(folder)
    return {name: CounterfactualDataset.load(folder / "datasets" / name) for name in metadata["datasets"]}


RUN_ALL_DESCRIPTION = """All three steps of the addition study: datasets + filtering, interchange sweeps, scores and heatmaps.

    ./run_study.sh [--model M] [--digits D] [--device cuda --dtype bfloat16] [--chat] [--test] ...

Steps 1 and 2 get every argument; step 3 scores the study folder they write (printed by this script)."""

if __name__ == "__main__":  # print the study folder for a set of step arguments (used by run_all.sh)
    print(study_dir(study_parser(RUN_ALL_DESCRIPTION, prog="run_study.sh").parse_args(sys.argv[1:])))
