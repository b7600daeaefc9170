"""The continuous-thought study's analyses on a latent-reasoning model (`tasks.ct_positions.latent_reasoning`):
predictions under blocking each thought, accuracy, error taxonomy, problem sensitivity, and whole-position patching
of each thought written in the project's results format so that step 3 scores it against the CT graphs.

The study runner calls them through the task's extra steps (``tasks/ct_positions/steps.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from causal.interchange_scores import compute_interchange_scores, wilson_interval
from causal.results import (
    CellSpec,
    DatasetRecord,
    RawResults,
    RawResultsWriter,
    ResultsManifest,
    UnitAddress,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
)
from causal.verdicts import POOLED, test_summary
from tasks.ct_positions.error_taxonomy import classify, reversal_results
from tasks.ct_positions.problem_sensitivity import FEATURES, plot_sensitivity, problem_features, sensitivity_report
from tasks.ct_positions.causal_models import CT_SLOTS, arg_var, op_var
from tasks.ct_positions.checker import ct_checker
from tasks.ct_positions.data import Problem, generate_problems, load_gsm8k, render

PATCHING_ID = "ct_patching"
"""The experiment id (and ``raw/`` folder) of whole-position patching of each thought."""


def load_reasoner(model_path: str | Path, codi_base: str | None = None, codi_masked: bool = False,
                  device: str | None = None) -> Any:
    """A ``LatentReasoner``: a CODI checkpoint folder when ``codi_base`` names its base model, else an organism
    folder (``latent_config.json`` + ``latent.safetensors``, `tasks.ct_positions.organism.load_organism`)."""
    if codi_base:
        from tasks.ct_positions.codi import CODISpec, load_codi

        import torch

        spec = CODISpec(base=codi_base, attention_mask_in_latent=codi_masked)
        return load_codi(model_path, spec, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from tasks.ct_positions.organism import load_organism

    reasoner, _ = load_organism(model_path)
    return reasoner


def load_problems(n_problems: int, seed: int, style: str, gsm8k: Path | None = None,
                  limit: int | None = None) -> list[Problem]:
    """GSM8K problems from a JSONL file, or ``n_problems`` generated held-out problems (2-4 operations)."""
    if gsm8k is not None:
        return load_gsm8k(gsm8k, limit)
    return generate_problems(limit or n_problems, seed=seed, split="heldout", style=style)


def run_condition(reasoner: Any, problems: Sequence[Problem], condition: str, batch_size: int,
                  **kwargs: Any) -> list[dict[str, Any]]:
    """Predictions of one condition on every problem."""
    rows = []
    for start in tqdm(range(0, len(problems), batch_size), desc=condition, mininterval=5.0):
        chunk = problems[start:start + batch_size]
        run = reasoner.run([p.question for p in chunk], **kwargs)
        for p, text, answer in zip(chunk, run.texts, run.answers):
            reversals = reversal_results(p.start, p.ops, p.args) if p.start is not None and p.args else []
            rows.append({
                "condition": condition, "problem_id": p.problem_id, "question": p.question, "gold": p.gold,
                "generated_text": text, "parsed_answer": answer,
                "correct": answer is not None and float(answer) == float(p.gold),
                "category": classify(text, answer, p.gold, p.intermediates, reversals),
                "n_ops": p.n_ops,
            })
    return rows


def _verdicts(scores: Any) -> dict[str, Any]:
    """Per slot, the pooled verdict of the paired rule (causal.verdicts) with its cell, effect and CI."""
    verdicts = scores.verdicts()
    out: dict[str, Any] = {"rule": verdicts.rule.describe()}
    for r in verdicts.best[verdicts.best["scope"] == POOLED].itertuples(index=False):
        out[r.target_variables] = test_summary(r)
    return out


def accuracy_table(frame: pd.DataFrame) -> dict[str, Any]:
    out = {}
    for condition, group in frame.groupby("condition", sort=False):
        k, n = int(group["correct"].sum()), len(group)
        low, high = wilson_interval(k, n)
        by_ops = {f"{int(o)}_ops": float(g["correct"].mean()) for o, g in group.groupby("n_ops")}
        out[str(condition)] = {"n": n, "n_correct": k, "accuracy": k / n, "ci_low": low, "ci_high": high,
                               "accuracy_by_n_ops": by_ops}
    return out


def write_predictions(frame: pd.DataFrame, out: Path) -> None:
    atomic_write_parquet(out / "predictions.parquet", frame)
    lines = "\n".join(json.dumps(r) for r in frame.to_dict(orient="records")) + "\n"
    atomic_write_bytes(out / "predictions.jsonl", lines.encode())


def problem_type(p: Problem) -> str:
    return f"{p.n_ops}ops:" + "+".join(sorted(set(p.ops))) if p.ops else "unknown"


def sensitivity(reasoner: Any, problems: Sequence[Problem], frame: pd.DataFrame, out: Path) -> dict:
    tokenize = lambda text: reasoner.tokenizer(text)["input_ids"]  # noqa: E731
    features = pd.DataFrame([problem_features(p.question, p.ops or None, tokenize) for p in problems],
                            index=[p.problem_id for p in problems])[list(FEATURES)]
    types = pd.Series({p.problem_id: problem_type(p) for p in problems})
    base = frame[frame["condition"] == "baseline"].set_index("problem_id")["correct"].astype(float)
    reports, impacts = {}, {}
    for condition in frame["condition"].unique():
        if condition == "baseline":
            continue
        other = frame[frame["condition"] == condition].set_index("problem_id")["correct"].astype(float)
        impacts[condition] = (base - other.reindex(base.index)).rename("impact")
        reports[condition] = sensitivity_report(features, impacts[condition], types, base.astype(bool))
    plot_sensitivity(features, impacts, reports, str(out / "sensitivity_scatter.png"), str(out / "sensitivity_bars.png"))
    atomic_write_parquet(out / "features.parquet", features.reset_index(names="problem_id"))
    result = {"features": list(FEATURES), "conditions": reports}
    atomic_write_json(out / "sensitivity.json", result)
    return result


def _prompt(setting: dict[str, Any], n_ops: int, style: str) -> str:
    ops = [setting[op_var(i)] for i in range(1, n_ops + 1)]
    args = [int(setting[arg_var(i)]) for i in range(1, n_ops + 1)]
    return render(int(setting["start"]), ops, args, style)


def _row(i: int, text: str) -> dict[str, Any]:
    return {"example_index": i, "output_text": text, "output_token_ids": [], "topk_token_ids": [], "topk_logits": []}




def ct_patching(reasoner: Any, datasets: dict[str, Any], n_ops: int, style: str, folder: Path, model_name: str,
                seed: int = 0, restart: bool = False) -> RawResults:
    """Patch the whole residual stream (every block) at CT_j from the counterfactual run, for every thought j, on
    ``datasets``; written to ``folder`` in the project's results format (resumable per dataset).

    The unit is recorded as ``layer=-1, component="ct_block_outputs", position_id="ct_<j>"``: the engine has no
    latent-reasoning forward, so these results come from `LatentReasoner` edits (``ThoughtEdit``), not from
    `InterventionEngine`."""
    from tasks.ct_positions.latent_reasoning import ThoughtEdit

    k = reasoner.config.num_thoughts
    size = max(len(ds) for ds in datasets.values())
    cells = [CellSpec(cell_id=f"ct_{j}", units=[UnitAddress(layer=-1, component="ct_block_outputs",
                                                            position_id=f"ct_{j}")]) for j in range(k)]
    manifest = ResultsManifest(
        experiment_id=PATCHING_ID, experiment_type="ct_position_patching", model={"name": model_name},
        settings={"counterfactual_index": 0, "style": style, "seed": seed, "n_ops": n_ops},
        datasets=[DatasetRecord(dataset_id=d, fingerprint=ds.fingerprint(), size=len(ds)) for d, ds in datasets.items()],
        cells=cells, example_batch_size=size, cell_groups=[[c.cell_id for c in cells]],
    )
    writer = RawResultsWriter(folder, manifest, restart=restart)
    for dataset_id, ds in datasets.items():
        if writer.has_part(dataset_id, 0):
            continue
        examples = ds.to_list()
        base_q = [_prompt(e["input"], n_ops, style) for e in examples]
        cf_q = [_prompt(e["counterfactual_inputs"][0], n_ops, style) for e in examples]
        print(f"patching {dataset_id}: {len(examples)} pairs x {k} thoughts", flush=True)
        base = reasoner.run(base_q)
        source = reasoner.run(cf_q, capture_residual=True)
        base_rows = [_row(i, t) for i, t in enumerate(base.texts)]
        cell_rows = []
        for j in range(k):
            run = reasoner.run(base_q, edits=[ThoughtEdit(j, "residual", "patch", source.thought_residual[:, j])])
            cell_rows += [{"cell_id": f"ct_{j}", **_row(i, t)} for i, t in enumerate(run.texts)]
        writer.write_part(dataset_id, 0, base_rows, cell_rows)
    return writer.results()


def ct_graph_scores(raw: RawResults, models: dict[str, Any], datasets: dict[str, Any]) -> dict[str, Any]:
    """Per causal model: IIA of each slot at each thought, the diagonal (slot ct_j at the patch of CT_j), floors
    (the unpatched output on the same labels), the pooled verdict per slot; and the base accuracy per dataset."""
    entry: dict[str, Any] = {}
    scores = None
    for name, model in models.items():
        scores = compute_interchange_scores(raw, model, datasets, [[s] for s in CT_SLOTS], ct_checker)
        table = scores.pooled()
        floors = _floors(raw, model, datasets)
        cells = set(table["cell_id"])
        diagonal = {s: float(table[(table.target_variables == s) & (table.cell_id == s)]["accuracy"].iloc[0])
                    for s in CT_SLOTS if s in cells}
        entry[name] = {
            "causal_model": model.id,
            "iia": {f"{r.target_variables}@{r.cell_id}": round(float(r.accuracy), 4) for r in table.itertuples()},
            "diagonal": diagonal,
            "floor": floors,
            "mean_diagonal_minus_floor": float(np.mean([diagonal[s] - floors[s] for s in diagonal])),
            "verdicts": _verdicts(scores),
        }
    if scores is not None:
        entry["base_accuracy"] = {r.dataset_id: float(r.accuracy) for r in scores.base_accuracy.itertuples()}
    return entry


def _floors(raw: RawResults, model: Any, datasets: dict[str, Any]) -> dict[str, float]:
    """Per slot: share of unpatched outputs that already equal the slot's interchange label."""
    hits: dict[str, list[bool]] = {s: [] for s in CT_SLOTS}
    for dataset_id, ds in datasets.items():
        base = raw.base_outputs(dataset_id).set_index("example_index")["output_text"]
        for i, e in enumerate(ds.to_list()):
            for slot in CT_SLOTS:
                label = model.run_interchange(e["input"], {slot: e["counterfactual_inputs"][0]})["raw_output"]
                hits[slot].append(ct_checker(base[i], label))
    return {s: float(np.mean(v)) for s, v in hits.items()}


def blocking_study(reasoner: Any, problems: Sequence[Problem], out: Path, batch_size: int,
                   layers: list[int] | None = None, heads: list[int] | None = None, n_boot: int = 2000,
                   seed: int = 0) -> dict[str, Any]:
    """Baseline and blocking of each thought on every problem: predictions, accuracy, taxonomy, sensitivity,
    written to ``out``; returns the accuracy table, taxonomy summary and sensitivity report."""
    from tasks.ct_positions.error_taxonomy import plot_taxonomy, taxonomy_report, taxonomy_summary
    from tasks.ct_positions.latent_reasoning import block_thoughts

    rows = run_condition(reasoner, problems, "baseline", batch_size)
    for j in range(reasoner.config.num_thoughts):
        rows += run_condition(reasoner, problems, f"block_ct{j}", batch_size,
                              attention_ops=block_thoughts([j], layers, heads))
    frame = pd.DataFrame(rows)
    write_predictions(frame, out)
    acc = accuracy_table(frame)
    atomic_write_json(out / "accuracy.json", acc)
    report = taxonomy_report(frame, n_boot=n_boot, seed=seed)
    summary = taxonomy_summary(report)
    atomic_write_json(out / "taxonomy.json", report)
    atomic_write_json(out / "taxonomy_summary.json", summary)
    plot_taxonomy(report, str(out / "taxonomy.png"))
    sens = sensitivity(reasoner, problems, frame, out)
    return {"accuracy": acc, "taxonomy": summary, "sensitivity": sens}


def conditions_lines(acc: dict, tax: dict, sens: dict) -> list[str]:
    """Markdown: accuracy, top error and significant category changes per condition; accuracy by number of
    operations; the strongest feature correlations with each condition's impact."""
    lines = ["| condition | accuracy | 95% CI | top error (share) | significant category changes |",
             "|---|---|---|---|---|"]
    for c, a in acc.items():
        t = tax.get(c, {})
        changes = ", ".join(f"{k} {v:+.3f}" for k, v in t.get("significant_changes", {}).items()) or "–"
        top = f"{t.get('top_error')} ({t.get('top_error_share', 0):.3f})" if t.get("top_error") else "–"
        lines.append(f"| {c} | {a['accuracy']:.3f} | [{a['ci_low']:.3f}, {a['ci_high']:.3f}] | {top} | {changes} |")
    lines += ["", "Accuracy by number of operations:", ""]
    for c, a in acc.items():
        lines.append(f"- {c}: " + ", ".join(f"{k} {v:.3f}" for k, v in a["accuracy_by_n_ops"].items()))
    lines += ["", "Strongest feature correlations with impact (Pearson r, p):", ""]
    for c, rep in sens["conditions"].items():
        for label, r in (("all problems", rep), ("baseline-correct only", rep.get("among_baseline_correct"))):
            if not r:
                continue
            ranked = sorted(((f, v) for f, v in r["correlations"].items() if v["pearson_r"] is not None),
                            key=lambda x: -abs(x[1]["pearson_r"]))[:3]
            lines.append(f"- {c}, {label} (n {r['n']}, broken {r['n_broken']}, fixed {r['n_fixed']}): " + ", ".join(
                f"{f} r={v['pearson_r']:+.2f} (p={v['pearson_p']:.1e})" for f, v in ranked))
    return lines


def ct_graph_lines(n_ops: int, entry: dict[str, Any]) -> list[str]:
    """Markdown: per CT graph, the diagonal IIA with floors and the verdict per slot."""
    lines = []
    for name, r in entry.items():
        if name == "base_accuracy":
            continue
        lines.append(f"- {n_ops} ops, {name} ({r['causal_model']}; mean IIA − floor "
                     f"{r['mean_diagonal_minus_floor']:+.2f}): " + ", ".join(
                         f"{s} {v:.2f} (floor {r['floor'][s]:.2f})" for s, v in r["diagonal"].items()))
        verdicts = {k: v for k, v in r["verdicts"].items() if k != "rule"}
        lines.append("  verdicts (paired test vs the unpatched run, Holm): " + ", ".join(
            f"{slot} {v['grade']}" + (f" at {v['cell_id']} (effect {v['effect']:+.2f})"
                                      if v["grade"] in ("full", "partial") else "")
            for slot, v in verdicts.items()))
    return lines
