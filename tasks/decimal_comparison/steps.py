"""The decimal study's extra steps, run by the study runner beside filter → intervene → score → report.

    python -m experiments.study --task decimal_comparison [--test] [--format qa --source-format simple] ...

Each step reads the study folder and writes ``<study>/analyses/<step>/`` (data as JSON; its own raw results, on
datasets other than the study's, under ``raw/`` there):

- ``bug_rate`` (after filter): 9.8 vs 9.11 once per format, then correct / buggy / unparseable per format on
  ``--n-bug`` disagreeing pairs, by stratum, plus control pairs;
- ``patching`` (after intervene, no model): the success metric of the step-2 sweeps (one per component: fix rate on
  ``fix``, break rate on ``break``, floors, paired verdicts);
- ``generalisation``: the best fixing cells on fresh held-out pairs;
- ``attention``: attention mass from the last position on the decimals vs the format's own tokens;
- ``transplant``: attention transplantation and blocking per layer and head, head-subset sweeps;
- ``ablation``: zero and mean ablation of each head of the critical layers, MLP-neuron ablation.

The report sections (`tasks.decimal_comparison.report`) turn these into tables and figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from causal.results import atomic_write_json
from experiments.task import ExtraStep, StudyContext
from tasks.decimal_comparison.analyses import COMPONENTS, critical_layers, success_rows

QUICK = {"n_bug": 16, "n_general": 8, "n_attention": 4, "subset_draws": 1}
"""Sizes of a ``--test`` run (the full defaults are in each option's help)."""
FULL = {"n_bug": 100, "n_general": 100, "n_attention": 32, "subset_draws": 3}


def _size(context: StudyContext, name: str) -> int:
    given = getattr(context.options, name, None)
    return int(given) if given is not None else (QUICK if context.test else FULL)[name]


def data_path(folder: Path, name: str) -> Path:
    """Where the data ``name`` (``bug_rate``, ``patching``, ``transplant``, ``blocking`` …) of a study lives."""
    step = {"blocking": "transplant"}.get(name, name)
    return folder / "analyses" / step / f"{name}.json"


def load_data(folder: Path, name: str) -> dict[str, Any]:
    """The data ``name`` of the study in ``folder`` (FileNotFoundError naming the step that writes it)."""
    path = data_path(folder, name)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the study's {path.parent.name!r} step "
                                f"(python -m experiments.study --task decimal_comparison --steps {path.parent.name})")
    return json.loads(path.read_text())


def formats_of(context: StudyContext) -> list[str]:
    """The formats measured: ``--bug-formats``, else simple, qa, chat and the study's two (``--chat`` drops the
    ``chat`` format: every format is then wrapped in the chat template)."""
    from tasks.decimal_comparison.formats import FORMATS

    s = context.settings
    chosen = getattr(context.options, "bug_formats", None) or list(dict.fromkeys(
        ["simple", "qa", "chat", s.source_format, s.format]))
    return [f for f in chosen if not (getattr(context.options, "chat", False) and FORMATS[f].chat)]


def study_pairs(context: StudyContext) -> list[Any]:
    """The decimal pairs of the study's ``fix`` dataset (the same pairs as ``break``)."""
    from tasks.decimal_comparison.pairs import make_pair

    dataset = context.datasets()["fix"]
    return [make_pair(ex["input"]["x"], ex["input"]["y"]) for ex in dataset]


def _engine_options(context: StudyContext) -> dict[str, Any]:
    return {"batch_size": context.options.batch_size, "max_rows": context.options.max_rows, "restart": context.restart}


# ---------------------------------------------------------------------------------------- bug rate
def bug_rate_options(group: Any) -> None:
    group.add_argument("--bug-formats", nargs="+", default=None, metavar="FORMAT",
                       help="formats whose bug rate is measured (default: simple qa chat and the study's two)")
    group.add_argument("--n-bug", type=int, default=None, help="disagreeing pairs per format (default 100; --test 16)")


def run_bug_rate(context: StudyContext) -> None:
    from tasks.decimal_comparison.analyses import bug_rates, quick_check

    pipeline = context.load_pipeline()
    formats = formats_of(context)
    out = {"quick_check": quick_check(pipeline, formats)}
    out.update(bug_rates(pipeline, formats, _size(context, "n_bug"), int(context.metadata().get("seed", 0)),
                         context.settings.split, context.options.batch_size))
    atomic_write_json(data_path(context.folder, "bug_rate"), out)
    print("bug rates:", {f: round(r["buggy"]["rate"], 3) for f, r in out["formats"].items()})


# ---------------------------------------------------------------------------------------- patching metric
def patching_experiments(context: StudyContext) -> dict[str, Any]:
    """The step-2 sweeps of the study (one per component), as RawResults."""
    from causal.results import RawResults

    recorded = {e["id"]: e for e in context.metadata().get("experiments", [])}
    found = {c: RawResults(context.folder / recorded[c]["folder"]) for c in COMPONENTS if c in recorded}
    if not found:
        raise FileNotFoundError(f"{context.folder / 'metadata.json'} records none of the sweeps "
                                f"{', '.join(COMPONENTS)}: run the intervene step")
    return found


def run_patching(context: StudyContext) -> None:
    raws = patching_experiments(context)
    datasets = context.datasets()
    rows = success_rows(raws, datasets, "patching", format=context.settings.format)
    layers = sorted({r["layer"] for r in rows})
    roles = list(dict.fromkeys(r["position_id"] for r in rows))
    atomic_write_json(data_path(context.folder, "patching"), {
        "rows": rows, "layers": layers, "components": [c for c in COMPONENTS if c in raws], "roles": roles,
        "n_pairs": len(next(iter(datasets.values()))), "source_format": context.settings.source_format})
    best = max((r for r in rows if r["direction"] == "fix"), key=lambda r: r["success"]["rate"], default=None)
    if best is not None:
        print(f"best fixing cell: {best['cell_id']} fix rate {best['success']['rate']:.2f} "
              f"(floor {best['floor']['rate']:.2f})")


def _patching(context: StudyContext) -> dict[str, Any]:
    return load_data(context.folder, "patching")


# ---------------------------------------------------------------------------------------- generalisation
def generalisation_options(group: Any) -> None:
    group.add_argument("--n-general", type=int, default=None, help="held-out pairs (default 100; --test 8)")


def run_generalisation(context: StudyContext) -> None:
    from tasks.decimal_comparison.analyses import best_rows, cells_by_ids, direction_datasets, run_cells
    from tasks.decimal_comparison.pairs import sample_pairs

    patch = _patching(context)
    top = [b["cell_id"] for b in best_rows(patch["rows"], "fix", top=3)]
    s = context.settings
    seen = {(p.x, p.y) for p in study_pairs(context)}
    held = sample_pairs(_size(context, "n_general"), seed=int(context.metadata().get("seed", 0)) + 2, split=s.split,
                        exclude=seen)
    pipeline = context.load_pipeline()
    datasets = direction_datasets(pipeline, held, s.source_format, [s.format])
    folder = context.analysis_dir("generalisation")
    rows = run_cells(pipeline, cells_by_ids(pipeline, top, patch["roles"]), datasets, folder / "raw",
                     "generalisation", **_engine_options(context))
    atomic_write_json(data_path(context.folder, "generalisation"), {"rows": rows, "cells": top, "n_pairs": len(held)})


# ---------------------------------------------------------------------------------------- attention
def attention_options(group: Any) -> None:
    group.add_argument("--n-attention", type=int, default=None, help="pairs per format (default 32; --test 4)")


def run_attention(context: StudyContext) -> None:
    from tasks.decimal_comparison.analyses import attention_analysis
    from tasks.decimal_comparison.pairs import sample_pairs

    s = context.settings
    pairs = sample_pairs(_size(context, "n_attention"), seed=int(context.metadata().get("seed", 0)) + 3, split=s.split)
    formats = [s.source_format, *[f for f in formats_of(context) if f != s.source_format]]
    att = attention_analysis(context.load_pipeline(), pairs, formats, s.source_format)
    atomic_write_json(data_path(context.folder, "attention"), att)


# ---------------------------------------------------------------------------------------- transplant
def transplant_options(group: Any) -> None:
    group.add_argument("--transplant-layers", type=int, nargs="+", default=None,
                       help="layers transplanted and blocked (default: all when there are at most 8, else the 3 "
                            "whose attention-output patch fixes most)")
    group.add_argument("--subset-layer", type=int, default=None,
                       help="layer of the head-subset sweeps (default: the best whole-layer transplant or block)")
    group.add_argument("--subset-draws", type=int, default=None, help="random head subsets per size k (default 3; "
                                                                      "--test 1)")
    group.add_argument("--subset-pools", nargs="+", default=["all", "even", "odd"], help="head pools: all even odd")
    group.add_argument("--subset-modes", nargs="+", default=["transplant", "patch", "block"],
                       help="transplant, patch and/or block")
    group.add_argument("--success-threshold", type=float, default=0.8, help="a subset succeeds at this fix rate")


def run_transplant(context: StudyContext) -> None:
    import numpy as np

    from tasks.decimal_comparison.analyses import blocking_cells, subset_cells, subset_summary, transplant_cells

    o, s = context.options, context.settings
    patch = _patching(context)
    critical = critical_layers(patch["rows"], patch["layers"], "attention_output")
    layers = o.transplant_layers or (patch["layers"] if len(patch["layers"]) <= 8 else critical[:3])
    pipeline = context.load_pipeline()
    datasets = context.datasets()
    folder = context.analysis_dir("transplant")
    engine = _engine_options(context)

    def run(cells: list[Any], name: str) -> list[dict]:
        from experiments.engine.intervention_experiment import InterventionExperiment

        raw = InterventionExperiment(pipeline, cells, {"id": name, "batch_size": engine["batch_size"],
                                                       "max_rows_per_forward": engine["max_rows"]}
                                     ).perform_interventions(datasets, results_dir=folder / "raw" / name, verbose=True,
                                                             restart=engine["restart"])
        return success_rows({"": raw}, datasets, name, format=s.format)

    trows = run(transplant_cells(pipeline, layers), "transplant")
    brows = run(blocking_cells(pipeline, layers), "blocking")
    whole = {layer: max(np.mean([r["success"]["rate"] for r in trows + brows
                                 if r["cell_id"] == f"{kind}.L{layer}.all" and r["direction"] == "fix"] or [0.0])
                        for kind in ("transplant", "block")) for layer in layers}
    best_layer = o.subset_layer if o.subset_layer is not None else max(layers, key=lambda l: (whole[l], -l))
    srows: list[dict] = []
    for mode in o.subset_modes:
        srows += run(subset_cells(pipeline, best_layer, _size(context, "subset_draws"),
                                  int(context.metadata().get("seed", 0)), mode, o.subset_pools), f"subsets_{mode}")
    atomic_write_json(data_path(context.folder, "blocking"), {"rows": brows, "layers": layers})
    atomic_write_json(data_path(context.folder, "transplant"), {
        "rows": trows, "layers": layers, "subset_layer": best_layer, "subset_rows": srows,
        "subsets": subset_summary(srows, o.success_threshold), "threshold": o.success_threshold})


# ---------------------------------------------------------------------------------------- ablation
def ablation_options(group: Any) -> None:
    group.add_argument("--ablation-layers", type=int, nargs="+", default=None,
                       help="layers whose heads are ablated (default: the two whose attention-output patch fixes most)")
    group.add_argument("--neuron-layer", type=int, default=None,
                       help="MLP layer whose neurons are ranked and ablated (default: its MLP-output patch fixes most)")
    group.add_argument("--neurons", default=None, help="MLP neurons to ablate, LAYER:N,N;LAYER:N (default: ranked)")


def run_ablation(context: StudyContext) -> None:
    from tasks.decimal_comparison.analyses import (
        ablation_cells,
        head_means,
        neuron_study,
        run_cells,
        same_format_dataset,
        setting,
    )
    from tasks.decimal_comparison.neurons import parse_neurons

    o, s = context.options, context.settings
    patch = _patching(context)
    layers = o.ablation_layers or critical_layers(patch["rows"], patch["layers"], "attention_output")[:2]
    pairs = study_pairs(context)
    pipeline = context.load_pipeline()
    means = head_means(pipeline, layers, [setting(pipeline, p, f) for p in pairs[:32] for f in (s.source_format, s.format)])
    datasets = {f"fix.{s.format}": same_format_dataset(pipeline, pairs, s.format, f"fix.{s.format}"),
                f"break.{s.source_format}": same_format_dataset(pipeline, pairs, s.source_format,
                                                                f"break.{s.source_format}")}
    folder = context.analysis_dir("ablation")
    rows = run_cells(pipeline, ablation_cells(pipeline, layers, means), datasets, folder / "raw", "ablation",
                     **_engine_options(context))
    mlp_layer = o.neuron_layer if o.neuron_layer is not None else critical_layers(
        patch["rows"], patch["layers"], "mlp_output")[0]
    neurons = neuron_study(pipeline, pairs, s.source_format, [s.format], mlp_layer,
                           parse_neurons(o.neurons) if o.neurons else None, context.options.batch_size)
    atomic_write_json(data_path(context.folder, "ablation"), {"rows": rows, "layers": layers, "neurons": neurons})


EXTRA_STEPS: tuple[ExtraStep, ...] = (
    ExtraStep("bug_rate", run_bug_rate, after="filter", description="bug rate per format",
              options=bug_rate_options),
    ExtraStep("patching", run_patching, after="intervene", description="fix / break rates of the sweeps; no model"),
    ExtraStep("generalisation", run_generalisation, after="intervene", description="best cells on held-out pairs",
              options=generalisation_options),
    ExtraStep("attention", run_attention, after="intervene", description="attention from the answer position",
              options=attention_options),
    ExtraStep("transplant", run_transplant, after="intervene",
              description="attention transplantation, blocking, head subsets", options=transplant_options),
    ExtraStep("ablation", run_ablation, after="intervene", description="head and MLP-neuron ablation",
              options=ablation_options),
)
