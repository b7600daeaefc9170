"""The continuous-thought study's extra steps and report sections, run by the study runner:

    python -m experiments.study --task ct_positions [--n-ops 3] [--test] [--model DIR [--codi-base NAME]]

The engine runs prompt passes and token generation of an ``LMPipeline``; a latent-reasoning model needs a loop that
feeds each thought's last hidden state back as the next input embedding (`tasks.ct_positions.latent_reasoning`), so this
task declares no sweeps and its interventions are extra steps on a ``LatentReasoner``:

- ``ct_patching`` (after intervene): the whole residual stream at CT_j patched from the counterfactual run, for each
  thought j, on the study's datasets; written to ``raw/ct_patching`` in the results format and recorded in
  metadata.json, so step 3 scores it against both CT graphs (verdicts, controls, heatmaps) like any sweep; the
  diagonal IIA per slot with floors goes to ``analyses/ct_patching/ct_scores.json``;
- ``blocking`` (after intervene): the baseline and the blocking of each thought (attention from every later position,
  prompt pass and every decoding step) on generated problems or GSM8K; predictions, accuracy, error taxonomy and
  problem sensitivity in ``analyses/blocking/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.task import ExtraStep, StudyContext

QUICK_PROBLEMS, FULL_PROBLEMS = 60, 600


def model_options(group: Any) -> None:
    group.add_argument("--codi-base", default=None,
                       help="--model is a CODI checkpoint folder of this base model (hub name or folder)")
    group.add_argument("--codi-masked", action="store_true", help="CODI: mask padding in latent and decoding steps")


def _reasoner(context: StudyContext) -> Any:
    from tasks.ct_positions.analyses import load_reasoner

    o = context.options
    return load_reasoner(context.model_path(), getattr(o, "codi_base", None), getattr(o, "codi_masked", False),
                         getattr(o, "device", None))


# ---------------------------------------------------------------------------------------- patching
def run_ct_patching(context: StudyContext) -> None:
    from causal.results import atomic_write_json
    from experiments.steps.intervene import record_experiment
    from tasks.ct_positions.analyses import PATCHING_ID, ct_graph_scores, ct_patching

    s = context.settings
    datasets = context.datasets()
    reasoner = _reasoner(context)
    if reasoner.config.num_thoughts != 6:
        print(f"ct_patching: the CT graphs have 6 slots, this model thinks {reasoner.config.num_thoughts} thoughts; "
              f"skipped")
        return
    folder = context.folder / "raw" / PATCHING_ID
    raw = ct_patching(reasoner, datasets, s.n_ops, s.style, folder, context.model,
                      seed=int(context.metadata().get("seed", 0)), restart=context.restart)
    record_experiment(context.folder, PATCHING_ID, "ct_position_patching", folder)
    scores = {"site": "block outputs of every layer at CT_j (whole position)", "n_ops": {
        str(s.n_ops): ct_graph_scores(raw, context.task.causal_models(s), datasets)}}
    atomic_write_json(context.analysis_dir("ct_patching") / "ct_scores.json", scores)


# ---------------------------------------------------------------------------------------- blocking
def blocking_options(group: Any) -> None:
    group.add_argument("--n-problems", type=int, default=None,
                       help=f"generated held-out problems (default {FULL_PROBLEMS}; --test {QUICK_PROBLEMS})")
    group.add_argument("--gsm8k", type=Path, default=None, help="GSM8K-format JSONL (question, answer '#### N')")
    group.add_argument("--limit", type=int, default=None, help="at most this many problems")
    group.add_argument("--heads", type=int, nargs="+", default=None,
                       help="block only these heads (with --layers: only those layers; default every one)")
    group.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the taxonomy's CIs")


def run_blocking(context: StudyContext) -> None:
    from tasks.ct_positions.analyses import blocking_study, load_problems

    o = context.options
    n = o.n_problems if o.n_problems is not None else (QUICK_PROBLEMS if context.test else FULL_PROBLEMS)
    seed = int(context.metadata().get("seed", 0))
    problems = load_problems(n, seed, context.settings.style, o.gsm8k, o.limit)
    blocking_study(_reasoner(context), problems, context.analysis_dir("blocking"), o.batch_size,
                   layers=o.layers or None, heads=o.heads, n_boot=o.n_boot, seed=seed)


# ---------------------------------------------------------------------------------------- report sections
def _read(path: Path, step: str) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the study's {step!r} step "
                                f"(python -m experiments.study --task ct_positions --steps {step})")
    return json.loads(path.read_text())


def blocking_section(context: StudyContext) -> list[str]:
    """Accuracy, error taxonomy and problem sensitivity per condition (baseline, block_ct0 …)."""
    from tasks.ct_positions.analyses import conditions_lines

    out = context.folder / "analyses" / "blocking"
    acc = _read(out / "accuracy.json", "blocking")
    return ["## Blocking each continuous thought", "",
            "Every later position (later thoughts, `<eot>`, every answer token) gets zero attention to CT_j, in every "
            "layer and head unless --layers / --heads narrow it; `analyses/blocking/` holds every prediction, the "
            "taxonomy with paired-bootstrap CIs and the sensitivity report.", "",
            *conditions_lines(acc, _read(out / "taxonomy_summary.json", "blocking"),
                              _read(out / "sensitivity.json", "blocking"))]


def ct_graph_section(context: StudyContext) -> list[str]:
    """The diagonal IIA of each slot with floors (the verdicts, controls and heatmaps are in the scores below)."""
    from tasks.ct_positions.analyses import ct_graph_lines

    scores = _read(context.folder / "analyses" / "ct_patching" / "ct_scores.json", "ct_patching")
    lines = ["## CT graphs on whole-position patches", "",
             "Diagonal IIA: slot ct_j scored on the patch at CT_j; floor = the unpatched run on the same labels.", ""]
    for n_ops, entry in scores["n_ops"].items():
        lines += ct_graph_lines(int(n_ops), entry)
    return lines


EXTRA_STEPS: tuple[ExtraStep, ...] = (
    ExtraStep("ct_patching", run_ct_patching, after="intervene",
              description="patch each thought; raw results for step 3; also the latent model's options",
              options=model_options),
    ExtraStep("blocking", run_blocking, after="intervene", description="block each thought; taxonomy, sensitivity",
              options=blocking_options),
)
SECTIONS = (blocking_section, ct_graph_section)
