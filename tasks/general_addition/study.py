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
from pathlib import Path
from typing import Any

from causal.counterfactual_dataset import CounterfactualDataset
from causal.raw_results import atomic_write_json
from tasks.general_addition.causal_models import DEFAULT_TEMPLATE, PROMPT_TEMPLATES
from tasks.general_addition.organism import ORGANISM_DIR

ORGANISM = "organism"
"""``--model organism`` is the shipped addition model (the default)."""


def model_path(model: str) -> str:
    """A hub name or local folder; ``organism`` means the shipped checkpoint."""
    return str(ORGANISM_DIR) if model == ORGANISM else model


def default_study_dir(model: str, n_digits: int, test: bool = False) -> Path:
    """``results/addition/<model>/<D>d`` (``<D>d_test`` for ``--test`` runs, which never touch a full study)."""
    slug = ORGANISM if model == ORGANISM else re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/"))
    return Path("results") / "addition" / slug / f"{n_digits}d{'_test' if test else ''}"


def _shard(text: str) -> tuple[int, int]:
    """``--shard I/N`` (imported lazily: ``python study.py`` runs without torch)."""
    from experiments.fleet import parse_shard

    return parse_shard(text)


def study_parser(description: str | None) -> argparse.ArgumentParser:
    """The options of steps 1 and 2 (one parser, so ``run_all.sh`` can pass the same arguments to both)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=ORGANISM,
                        help="hub name (e.g. meta-llama/Llama-3.1-8B-Instruct) or local HF folder; default: the shipped organism")
    parser.add_argument("--digits", type=int, default=2, choices=(2, 3, 4), help="digits per addend")
    parser.add_argument("--out", type=Path, default=None,
                        help="study folder (default results/addition/<model>/<D>d, or <D>d_test with --test)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    parser.add_argument("--test", action="store_true", help="tiny, fast run (smoke test)")
    step1 = parser.add_argument_group("step 1 (datasets)")
    step1.add_argument("--size", type=int, default=128, help="pairs sampled per dataset family (before filtering)")
    step1.add_argument("--seed", type=int, default=0)
    step1.add_argument("--template", default=DEFAULT_TEMPLATE, choices=sorted(PROMPT_TEMPLATES))
    step1.add_argument("--families", nargs="*", default=None, help="dataset families (default: all)")
    step2 = parser.add_argument_group("step 2 (interventions)")
    step2.add_argument("--batch-size", type=int, default=64, help="pairs per part (results file, resume unit)")
    step2.add_argument("--max-rows", type=int, default=1024, help="cells × pairs folded into one forward")
    step2.add_argument("--layers", type=int, nargs="*", default=None, help="layers (default: all; -1 = embeddings)")
    step2.add_argument("--no-heads", action="store_true", help="skip the attention-head sweep")
    step2.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                       help="run only shard I of N (every N-th part) into raw/shards/<sweep>/I-of-N")
    step2.add_argument("--merge-shards", type=int, default=None, metavar="N",
                       help="merge the N finished shards of each sweep into raw/<sweep> (no model needed)")
    return parser


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


if __name__ == "__main__":  # print the study folder for a set of step arguments (used by run_all.sh)
    import sys

    print(study_dir(study_parser(None).parse_args(sys.argv[1:])))
