"""Step 3: score raw results against the task's causal models (no network needed), draw heatmaps, write a summary.

    python -m experiments.steps.score --task general_addition --results results/addition/organism/2d [--target-vars carry_0 raw_output] [--hypotheses carry] [--include-pairs]
    python -m experiments.steps.score --task general_addition [--test] [--digits 3]  # the study steps 1 and 2 wrote
                                                                                  # with the same options

Scores exactly the experiments step 2 recorded in <study>/metadata.json (``experiments``); a folder
under raw/ that is not listed (e.g. a backup copy) is ignored with a note, a listed one without a
manifest is an error, and every manifest must match the study (model, dataset ids, fingerprints).
Each experiment is scored against every causal model of the task (main hypothesis first; ``--hypotheses``
picks some, the first named is the main one), each on its own variables: the task's default targets (or
``--target-vars``) that are its variables, and by default also its computed variables that the main
hypothesis lacks, so hypotheses with different variables are scored side by side. Scores: IIA, floor
(unintervened output vs the same labels) and informative IIA (pairs whose label the interchange
changes), pooled over pairs and per family, with 95% Wilson CIs. Writes <study>/scores/
(``scores_<…>/`` with --target-vars, --hypotheses or --include-pairs): one JSON of scores per (experiment,
hypothesis), heatmaps of the informative IIA under the main hypothesis (PNG) and summary.md. The
folder is built aside and replaces the old one only once complete. Imports no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from causal.causal_model import parse_target
from causal.counterfactual_dataset import CounterfactualDataset
from causal.controls import pairs_where_control_differs, standard_controls
from causal.interchange_scores import InterchangeScores, compute_interchange_scores, score_labels
from causal.results import MANIFEST_NAME, RawResults, atomic_write_bytes, atomic_write_json
from causal.verdicts import (POOLED, VerdictRule, Verdicts, compare_hypotheses, verdict_table_lines,
                             verdicts_from_per_example)
from experiments.steps.common import (add_debug_option, load_datasets, model_path, read_metadata, run_step, split_task,
                                      study_dir, study_parser)
from experiments.task import Task, computed_variables
from experiments.analysis.visualizations import save_heatmaps


class StudyRecordError(SystemExit):
    """The study's records and its raw results disagree (missing, foreign or unlisted results)."""


def scores_folder_name(target_vars: list[str] | None, include_pairs: bool, hypotheses: list[str] | None = None) -> str:
    """``scores`` for the default run; ``scores_[<hypotheses>__]<vars>[_pairs]`` otherwise, so partial runs never
    replace it."""
    if not target_vars and not include_pairs and not hypotheses:
        return "scores"
    chosen = "+".join(hypotheses) + "__" if hypotheses else ""
    name = "scores_" + re.sub(r"[^A-Za-z0-9_.+-]+", "_", chosen + "_".join(target_vars or ["all"])) + ("_pairs" if include_pairs else "")
    if len(name) > 80:  # keep the folder name short and still unique
        name = name[:60] + "_" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def listed_experiments(folder: Path, metadata: dict[str, Any]) -> tuple[list[tuple[dict[str, Any], Path]], list[str]]:
    """The experiments step 2 recorded, with their folders; plus notes on raw/ folders that are not listed.

    Raises StudyRecordError when nothing is recorded or a listed experiment has no manifest.
    """
    entries = metadata.get("experiments")
    if not entries:
        raise StudyRecordError(
            f"{folder / 'metadata.json'} records no experiments: run step 2 (interventions) (a rerun with the same "
            f"arguments skips finished parts and records them)")
    listed = []
    for entry in entries:
        path = folder / entry["folder"]
        if not (path / MANIFEST_NAME).exists():
            raise StudyRecordError(
                f"experiment {entry['id']!r} is listed in {folder / 'metadata.json'} but {path} holds no {MANIFEST_NAME}; "
                f"rerun step 2 (interventions) with the study's arguments to recompute it")
        listed.append((entry, path))
    known = {path.resolve() for _, path in listed}
    raw = folder / "raw"
    notes = [f"ignored `raw/{p.name}`: not an experiment listed in metadata.json (e.g. a backup copy)"
             for p in sorted(raw.iterdir()) if p.is_dir() and p.resolve() not in known] if raw.exists() else []
    return listed, notes


def check_manifest(task: Task, raw: RawResults, metadata: dict[str, Any],
                   datasets: dict[str, CounterfactualDataset]) -> None:
    """Refuse results computed on another model or other datasets than this study's."""
    manifest = raw.manifest
    where = f"results at {raw.root} (experiment {manifest.experiment_id!r})"
    study_model = str(metadata["model"])
    accepted = {study_model, Path(model_path(task, study_model)).name}
    recorded = manifest.model.get("name")
    if recorded not in accepted:
        raise StudyRecordError(f"{where} were computed on model {recorded!r}, but this study is on {study_model!r}")
    if "use_chat_template" in manifest.model and bool(manifest.model["use_chat_template"]) != bool(metadata.get("chat")):
        raise StudyRecordError(f"{where} used chat template={manifest.model['use_chat_template']}, "
                               f"but this study's datasets were filtered with chat={metadata.get('chat')}")
    ids = [record.dataset_id for record in manifest.datasets]
    if sorted(ids) != sorted(datasets):
        raise StudyRecordError(f"{where} hold datasets {ids}, but the study has {list(datasets)}")
    for record in manifest.datasets:
        fingerprint = datasets[record.dataset_id].fingerprint()
        if record.fingerprint != fingerprint:
            raise StudyRecordError(
                f"{where}: dataset {record.dataset_id!r} has fingerprint {record.fingerprint[:12]}… in the manifest "
                f"but {fingerprint[:12]}… in the study: the datasets were regenerated after step 2; rerun step 2")


def _ci(row: Any, prefix: str) -> str:
    low, high = row[f"{prefix}ci_low"], row[f"{prefix}ci_high"]
    return "n/a" if pd.isna(low) else f"[{low:.3f}, {high:.3f}]"


def _accuracy(value: float | None) -> str:
    return "not filtered (every pair kept)" if value is None else f"{value:.1%}"


def _num(value: Any) -> str:
    return "n/a" if pd.isna(value) else f"{value:.3f}"


def best_cell_lines(scores: InterchangeScores) -> list[str]:
    """Markdown table: per variable, the best cell (or "no cell") with IIA, floor and informative IIA."""
    lines = ["| variable | best cell | informative IIA | 95% CI | n informative | IIA | 95% CI | floor | 95% CI | n |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, row in scores.best_cells().iterrows():
        cell = f"`{row['cell_id']}`" if row["located"] else f"no cell carries it (highest: `{row['cell_id']}`)"
        lines.append(
            f"| {row['target_variables']} | {cell} | {_num(row['informative_accuracy'])} | {_ci(row, 'informative_')} | "
            f"{row['n_informative']} | {_num(row['accuracy'])} | {_ci(row, '')} | {_num(row['floor'])} | "
            f"{_ci(row, 'floor_')} | {row['n']} |")
    return lines


def per_family_lines(scores: InterchangeScores) -> list[str]:
    """Per variable, its best (or highest-ranked) cell broken down per family, plus the pooled row."""
    lines: list[str] = []
    pooled = scores.pooled().set_index(["target_variables", "cell_id"])
    for _, best in scores.best_cells().iterrows():
        group, cell = best["target_variables"], best["cell_id"]
        status = "best cell" if best["located"] else "no cell carries it; highest-ranked cell"
        lines += ["", f"`{group}` at `{cell}` ({status}):", "",
                  "| family | IIA | floor | informative IIA | n informative / n | above floor |", "|---|---|---|---|---|---|"]
        rows = [(r["dataset_id"], r) for _, r in scores.per_family(group, cell).iterrows()]
        rows.append(("**pooled**", pooled.loc[(group, cell)]))
        for family, r in rows:
            lines.append(
                f"| {family} | {_num(r['accuracy'])} {_ci(r, '')} | {_num(r['floor'])} {_ci(r, 'floor_')} | "
                f"{_num(r['informative_accuracy'])} {_ci(r, 'informative_')} | {r['n_informative']}/{r['n']} | "
                f"{'yes' if r['above_floor'] else 'no'} |")
    return lines


HOW_TO_READ = [
    "How to read: **IIA** is the share of pairs where the patched output equals the hypothesis' interchange label; "
    "the **floor** is the same checker on the *unpatched* output of the same pairs (what a patch that changes nothing "
    "scores). A **verdict** comes from a paired test on the same pairs: the **effect** is IIA - floor with a CI, the "
    "evidence is the pairs a patch moved towards the label (gained) against those it moved away (lost); the "
    "**informative IIA** is the IIA on the pairs where the network's own unpatched output differs from the label. "
    "Verdicts: **full**, **partial**, **none** (no cell carries the variable), **unsupported** (the hypothesis does "
    "not describe the unpatched network). Every study also scores **controls**, labels false by construction, "
    "which must come out none. Rule: see below and docs/verdicts.md.",
]


def verdict_lines(verdicts: Verdicts, describe: dict[str, str] | None = None) -> list[str]:
    """The pooled verdict table, what the base fit says, and where families disagree with the pooled verdict."""
    lines: list[str] = []
    if not verdicts.fits:
        fit = verdicts.base_fit.set_index("scope").loc[POOLED]
        lines += [f"**This hypothesis does not describe the network**: the unpatched output matches its base labels "
                  f"on {fit['accuracy']:.3f} of the pairs ({int(fit['n_correct'])}/{int(fit['n'])}, needed "
                  f">= {verdicts.rule.min_base_accuracy}); its interchange results cannot support a location.", ""]
    lines += ["Verdict per variable (pooled over all families):", "", *verdict_table_lines(verdicts, describe=describe)]
    if verdicts.disagreements:
        lines += ["", "Where families disagree with the pooled verdict:", ""]
        lines += [f"- {line}" for line in verdicts.disagreements]
    return lines


def comparison_lines(main: Verdicts, main_pairs: pd.DataFrame, other_name: str, other_pairs: pd.DataFrame) -> list[str]:
    """Where the main hypothesis locates a variable: at that cell, on the pairs where the two hypotheses'
    labels differ, how often the patched output follows each (paired, two-sided exact test)."""
    rows = []
    for r in main.best[(main.best["scope"] == POOLED) & main.best["grade"].isin(["full", "partial"])].itertuples():
        pick = lambda pairs: pairs[(pairs["target_variables"] == r.target_variables)  # noqa: E731
                                   & (pairs["cell_id"] == r.cell_id)]
        other = pick(other_pairs)
        if other.empty:
            continue
        table = compare_hypotheses(pick(main_pairs), other)
        if table.empty:
            rows.append(f"| {r.target_variables} | `{r.cell_id}` | 0 | - | - | - | - |")
            continue
        c = table.iloc[0]
        rows.append(f"| {r.target_variables} | `{r.cell_id}` | {c['n_differ']} | {c['first_only']} | {c['second_only']} | "
                    f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['p_value']:.2g} |")
    if not rows:
        return []
    return [f"Paired comparison with `{other_name}` at the cells `{main.name}` locates, on the pairs where the two "
            f"hypotheses' labels differ (patched output follows only the first / only the second):", "",
            "| variable | cell | pairs with different labels | follows first only | follows second only | "
            "difference [95% CI] | p (two-sided exact) |", "|---|---|---|---|---|---|---|", *rows]


def control_lines(verdicts: Verdicts) -> list[str]:
    """The controls' verdicts; a located control is reported as a failure of the study."""
    located = verdicts.located_variables()
    lines = ["Controls (labels false by construction, scored on the same raw results on the pairs where the control's "
             "label differs from the true one; each must be none):", ""]
    if located:
        lines += [f"**STUDY FAILURE: {len(located)} control(s) got a location ({', '.join(located)}); the verdicts of "
                  f"this experiment are not trustworthy.**", ""]
    else:
        n = verdicts.best[verdicts.best["scope"] == POOLED].shape[0]
        lines += [f"All {n} controls: none.", ""]
    return lines + verdict_table_lines(verdicts)


def _has(model: Any, group: list[str]) -> bool:
    return all(v in model.parents for key in group for v in parse_target(key))


def hypothesis_targets(task: Task, settings: Any, hypotheses: dict[str, Any], chosen: list[list[str]] | None,
                       position_ids: list[str] | None = None) -> dict[str, list[list[str]]]:
    """The target groups each hypothesis is scored on, in scoring order.

    ``chosen`` (``--target-vars``) or else the task's default targets (written for its main hypothesis): each
    hypothesis takes those that are its variables. By default a hypothesis other than the task's main one also
    takes its own computed variables that the main one lacks, so a competitor with other variables is scored on
    them. A chosen group that is a variable of none of ``hypotheses`` is refused (a typo)."""
    models = list(hypotheses.values())
    if chosen:
        missing = ["+".join(g) for g in chosen if not any(_has(m, g) for m in models)]
        if missing:
            others = ", ".join(repr(m.id) for m in models[1:])
            raise ValueError(f"target variable(s) {missing} are not variables of the main hypothesis {models[0].id!r}"
                             + (f" nor of {others}" if others else "") + f" (task {task.name!r})")
    main_name, main = next(iter(task.causal_models(settings).items()))
    groups = chosen or task.default_targets(settings, position_ids)
    out: dict[str, list[list[str]]] = {}
    for name, model in hypotheses.items():
        own = [g for g in groups if _has(model, g)]
        if not chosen and name != main_name:
            own += [[v] for v in computed_variables(model) if v not in main.parents]
            own.sort(key=lambda g: model.variables.index(parse_target(g[0])[0]))
        out[name] = own
    return out


UNIT_NAMES = {"patch_residual_stream": "residual stream", "patch_attention_heads": None}


def write_scores(task: Task, settings: Any, out: Path, metadata: dict[str, Any],
                 targets: list[list[str]] | dict[str, list[list[str]]],
                 include_pairs: bool, experiments: list[tuple[dict[str, Any], Path]], notes: list[str],
                 datasets: dict[str, CounterfactualDataset], rule: VerdictRule | None = None,
                 hypotheses: dict[str, Any] | None = None) -> list[str]:
    """Score every listed experiment into ``out`` (scores and verdict JSON, heatmaps, summary.md); returns the
    summary lines.

    ``hypotheses``: the causal models to score (default: all of the task's, main first); ``targets``: the groups
    per hypothesis (`hypothesis_targets`), or one list that each hypothesis takes its own variables from. The
    first hypothesis with a target is the main one (heatmaps, controls, paired comparisons)."""
    rule = rule or VerdictRule()
    describe = task.variable_descriptions(settings) if task.variable_descriptions is not None else {}
    hypotheses = hypotheses or task.causal_models(settings)
    if not isinstance(targets, dict):
        targets = hypothesis_targets(task, settings, hypotheses, targets)
    main_name = next((name for name in hypotheses if targets.get(name)), None)
    if main_name is None:
        raise ValueError(f"no hypothesis of task {task.name!r} has a variable to score ({', '.join(hypotheses)})")
    described = ", ".join(f"{k} {v}" for k, v in settings.model_dump().items())
    lines = [f"# {task.name} study: {metadata['model']}" + (f" ({described})" if described else ""), "",
             task.description, ""]
    lines += ["## Filtering (step 1)", "", "| dataset | model accuracy on inputs | pairs kept |", "|---|---|---|"]
    lines += [f"| {r['dataset_id']} | {_accuracy(r.get('input_accuracy'))} | {r['kept_pairs']}/{r['total_pairs']} |"
              for r in metadata["filter"]]
    lines += ["", "## Experiments scored", ""]
    lines += [f"- `{entry['id']}` ({entry.get('type', '?')}, `{entry['folder']}`)" for entry, _ in experiments]
    lines += [f"- note: {note}" for note in notes]
    lines += ["", *HOW_TO_READ, "", f"Verdict rule: {rule.describe()}."]
    for entry, raw_folder in experiments:
        raw = RawResults(raw_folder)
        experiment = raw.manifest.experiment_id
        kinds = sorted({cell.kind for cell in raw.manifest.cells} - {"interchange"})
        if kinds:  # interchange labels say nothing about ablations, blocks or transplants
            lines += ["", f"## {experiment}: not scored", "",
                      f"Its cells are {', '.join(kinds)} interventions; interchange accuracy applies to interchange "
                      f"cells only. Read its raw results directly."]
            continue
        kind = "heads" if raw.manifest.experiment_type == "patch_attention_heads" else "positions"
        position_order = list(dict.fromkeys(u.position_id for c in raw.manifest.cells for u in c.units))
        model_name = raw.manifest.model.get("name") or str(metadata["model"])
        every = list(dict.fromkeys("+".join(g) for groups in targets.values() for g in groups))
        for name, causal_model in hypotheses.items():
            own = targets.get(name, [])
            if not own:
                lines += ["", f"## {experiment}: hypothesis `{causal_model.id}` not scored", "",
                          f"It has none of the target variables ({', '.join(every)})."]
                continue
            scores = compute_interchange_scores(raw, causal_model, datasets, own, task.checker,
                                                include_pairs=include_pairs)
            scores.save(out / f"{experiment}__{name}.json")
            verdicts = scores.verdicts(rule)
            atomic_write_json(out / f"{experiment}__{name}__verdicts.json", verdicts.to_json())
            if name == main_name:
                true_pairs, main_groups, main_verdicts = scores.per_example, scores.target_variables, verdicts
                highlight = {r.target_variables: r.cell_id for r in verdicts.best.itertuples(index=False)
                             if r.scope == POOLED and r.grade in ("full", "partial")}
                pooled = scores.pooled()
                pooled["effect"] = pooled["accuracy"] - pooled["floor"]
                save_heatmaps(pooled, out / "heatmaps" / experiment, kind=kind, position_order=position_order,
                              hypothesis=causal_model.id, model=model_name, highlight=highlight, value="effect",
                              unit=UNIT_NAMES.get(raw.manifest.experiment_type))
            lines += ["", f"## {experiment}: hypothesis `{causal_model.id}`", ""]
            base = scores.base_accuracy
            skipped = [group for group in every if group not in {"+".join(g) for g in own}]
            if skipped:
                lines += [f"Not variables of this hypothesis (not scored for it): {', '.join(skipped)}.", ""]
            lines += ["Base accuracy (unpatched output vs this hypothesis' label): " + ", ".join(
                f"{r.dataset_id} {r.accuracy:.3f} ({r.n_correct}/{r.n})" for r in base.itertuples(index=False)), ""]
            lines += verdict_lines(verdicts, describe)
            if name != main_name:
                comparison = comparison_lines(main_verdicts, true_pairs, causal_model.id, scores.per_example)
                lines += ["", *comparison] if comparison else []
            lines += ["", "Descriptive: highest informative IIA per variable (label-based informative pairs; not a "
                      "verdict):", "", *best_cell_lines(scores)]
            if name == main_name and kind == "positions" and task.summary_extras is not None:
                lines += task.summary_extras(scores, settings, own)
            lines += ["", f"### {experiment}, `{causal_model.id}`: per family"]
            lines += per_family_lines(scores)
        main_model = hypotheses[main_name]
        controls = score_labels(raw, datasets, standard_controls(main_model, main_groups), task.checker,
                                name=f"controls of {main_model.id}")
        control_verdicts = verdicts_from_per_example(
            controls.metadata["causal_model_id"], pairs_where_control_differs(controls.per_example, true_pairs), rule,
            cell_order=[cell.cell_id for cell in raw.manifest.cells], is_control=True)
        atomic_write_json(out / f"{experiment}__controls__verdicts.json", control_verdicts.to_json())
        lines += ["", f"## {experiment}: controls", "", *control_lines(control_verdicts)]
    atomic_write_bytes(out / "summary.md", ("\n".join(lines) + "\n").encode())
    return lines


def main(argv: list[str] | None = None, task: str | None = None) -> Path:
    chosen, rest = split_task(argv, task)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=None,
                        help="study folder written by steps 1 and 2 (default: the one they write when given the "
                             "same model, test, out and task-setting options as here)")
    parser.add_argument("--target-vars", nargs="*", default=None,
                        help="variables to score, one group each, of any hypothesis (each hypothesis is scored on "
                             "those that are its own; default: the task's targets and each hypothesis' own variables)")
    parser.add_argument("--hypotheses", nargs="+", default=None, metavar="NAME",
                        help="causal models to score, the first as the main one (default: all, the task's order)")
    parser.add_argument("--include-pairs", action="store_true", help="also score every pair of the target variables jointly")
    add_debug_option(parser)
    args, others = parser.parse_known_args(rest)
    if args.results is None:  # the options of steps 1 and 2 name the study folder
        folder = study_dir(chosen, study_parser(chosen, None, prog=parser.prog).parse_args(others))
    elif others:
        parser.error(f"unrecognized arguments: {' '.join(others)}")
    else:
        folder = args.results
    metadata = read_metadata(folder)
    if metadata.get("task", chosen.name) != chosen.name:
        raise StudyRecordError(f"{folder} holds a study of task {metadata['task']!r}, not {chosen.name!r}")
    settings = chosen.settings(**{k: metadata[k] for k in chosen.settings.model_fields if k in metadata})
    experiments, notes = listed_experiments(folder, metadata)
    datasets = load_datasets(folder)
    raws = [RawResults(path) for _, path in experiments]
    for raw in raws:
        check_manifest(chosen, raw, metadata, datasets)
    position_ids = [u.position_id for raw in raws for c in raw.manifest.cells for u in c.units]
    hypotheses = chosen.causal_models(settings)
    if args.hypotheses:
        unknown = [name for name in args.hypotheses if name not in hypotheses]
        if unknown:
            raise ValueError(f"unknown hypothesis {unknown} of task {chosen.name!r}; known: {', '.join(hypotheses)}")
        hypotheses = {name: hypotheses[name] for name in dict.fromkeys(args.hypotheses)}
    chosen_targets = [[v] for v in args.target_vars] if args.target_vars else None
    targets = hypothesis_targets(chosen, settings, hypotheses, chosen_targets, position_ids)
    for note in notes:
        print(f"note: {note}")

    out = folder / scores_folder_name(args.target_vars, args.include_pairs, args.hypotheses)
    for stale in folder.glob(f".{out.name}.tmp-*"):  # left by a killed run of this step
        shutil.rmtree(stale, ignore_errors=True)
    building = Path(tempfile.mkdtemp(dir=folder, prefix=f".{out.name}.tmp-"))
    try:
        lines = write_scores(chosen, settings, building, metadata, targets, args.include_pairs, experiments, notes,
                             datasets, hypotheses=hypotheses)
        retired = folder / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, retired)
        os.replace(building, out)
        shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    print("\n".join(lines))
    print(f"\nscores, heatmaps and summary written to {out}")
    return out


if __name__ == "__main__":
    sys.exit(run_step(main))
