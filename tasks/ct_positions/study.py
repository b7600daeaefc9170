"""The CT-position study in one command: baseline + blocking each continuous thought, error
taxonomy, problem sensitivity, and (on generated problems) the CT causal graph scored on patching.

    python -m tasks.ct_positions.study                       # the shipped organism, generated problems
    python -m tasks.ct_positions.study --codi-checkpoint DIR --codi-base gpt2 --gsm8k test.jsonl --device cuda

Writes to ``--out`` (default ``results/ct_positions/organism``): ``predictions.parquet`` and
``predictions.jsonl`` (every problem x condition: problem id, question, gold, generated text, parsed
answer, correct, category), ``accuracy.json``, ``taxonomy.json`` / ``taxonomy_summary.json`` /
``taxonomy.png``, ``sensitivity.json`` / ``sensitivity_scatter.png`` / ``sensitivity_bars.png``,
``ct_patching/`` (raw results + ``ct_scores.json``), ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from causal.interchange_scores import compute_interchange_scores, wilson_interval
from causal.verdicts import POOLED, test_summary
from causal.results import (
    CellSpec,
    DatasetRecord,
    ResultsManifest,
    RawResultsWriter,
    UnitAddress,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
)
from experiments.error_taxonomy import classify, plot_taxonomy, reversal_results, taxonomy_report, taxonomy_summary
from experiments.latent_reasoning import LatentReasoner, ThoughtEdit, block_thoughts
from experiments.problem_sensitivity import FEATURES, plot_sensitivity, problem_features, sensitivity_report
from tasks.ct_positions.causal_models import CT_SLOTS, arg_var, op_var
from tasks.ct_positions.checker import ct_checker
from tasks.ct_positions.counterfactuals import make_ct_datasets
from tasks.ct_positions.data import Problem, generate_problems, load_gsm8k, render
from tasks.ct_positions.task import CTSettings, _causal_models

DEFAULT_OUT = Path("results/ct_positions/organism")


class StudyConfig(BaseModel):
    """What to run. Model: the organism (default), ``organism_dir``, or a CODI checkpoint folder."""

    model_config = ConfigDict(extra="forbid")
    out: Path = DEFAULT_OUT
    organism_dir: Path | None = None
    codi_checkpoint: Path | None = None
    codi_base: str | None = None
    codi_masked: bool = Field(False, description="mask padding in latent/decoding steps (reference: off)")
    gsm8k: Path | None = None
    limit: int | None = None
    n_problems: int = 600
    seed: int = 0
    style: str = "compact"
    batch_size: int = 100
    layers: list[int] | None = None
    heads: list[int] | None = None
    patching: bool = True
    patching_size: int = 64
    device: str = "cpu"
    n_boot: int = 2000
    num_threads: int = 2


def load_reasoner(cfg: StudyConfig) -> LatentReasoner:
    if cfg.codi_checkpoint is not None:
        from experiments.codi import CODISpec, load_codi

        if not cfg.codi_base:
            raise ValueError("--codi-checkpoint needs --codi-base (hub name or folder of the base model)")
        spec = CODISpec(base=cfg.codi_base, attention_mask_in_latent=cfg.codi_masked)
        return load_codi(cfg.codi_checkpoint, spec, device=cfg.device)
    from tasks.ct_positions.organism import ORGANISM_DIR, load_organism

    reasoner, _ = load_organism(cfg.organism_dir or ORGANISM_DIR)
    return reasoner


def load_problems(cfg: StudyConfig) -> list[Problem]:
    if cfg.gsm8k is not None:
        return load_gsm8k(cfg.gsm8k, cfg.limit)
    return generate_problems(cfg.limit or cfg.n_problems, seed=cfg.seed, split="heldout", style=cfg.style)


def run_condition(reasoner: LatentReasoner, problems: Sequence[Problem], condition: str, batch_size: int,
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


def sensitivity(reasoner: LatentReasoner, problems: Sequence[Problem], frame: pd.DataFrame, out: Path) -> dict:
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


# ---------------------------------------------------------------------------- CT causal model scoring
def _prompt(setting: dict[str, Any], n_ops: int, style: str) -> str:
    ops = [setting[op_var(i)] for i in range(1, n_ops + 1)]
    args = [int(setting[arg_var(i)]) for i in range(1, n_ops + 1)]
    return render(int(setting["start"]), ops, args, style)


def ct_patching(reasoner: LatentReasoner, cfg: StudyConfig, out: Path) -> dict[str, Any]:
    """Patch the whole residual stream (every block) at CT_j from the counterfactual run; score every
    CT slot of the graph on it, with floors (the unpatched output checked against the same labels)."""
    k = reasoner.config.num_thoughts
    results: dict[str, Any] = {"site": "block outputs of every layer at CT_j (whole position)", "n_ops": {}}
    for n_ops in (2, 3, 4):
        datasets = make_ct_datasets(n_ops, cfg.patching_size, cfg.seed)
        root = out / "ct_patching" / f"{n_ops}ops"
        cells = [CellSpec(cell_id=f"ct_{j}", units=[UnitAddress(layer=-1, component="ct_block_outputs",
                                                                position_id=f"ct_{j}")]) for j in range(k)]
        manifest = ResultsManifest(
            experiment_id=f"ct_patching_{n_ops}ops", experiment_type="ct_position_patching",
            model={"name": str(cfg.codi_checkpoint or cfg.organism_dir or "organism")},
            settings={"counterfactual_index": 0, "style": cfg.style, "seed": cfg.seed},
            datasets=[DatasetRecord(dataset_id=d, fingerprint=ds.fingerprint(), size=len(ds)) for d, ds in datasets.items()],
            cells=cells, example_batch_size=cfg.patching_size, cell_groups=[[c.cell_id for c in cells]],
        )
        writer = RawResultsWriter(root, manifest)
        for dataset_id, ds in datasets.items():
            if writer.has_part(dataset_id, 0):
                continue
            examples = ds.to_list()
            base_q = [_prompt(e["input"], n_ops, cfg.style) for e in examples]
            cf_q = [_prompt(e["counterfactual_inputs"][0], n_ops, cfg.style) for e in examples]
            print(f"patching {n_ops} ops, {dataset_id}: {len(examples)} pairs x {k} thoughts", flush=True)
            base = reasoner.run(base_q)
            source = reasoner.run(cf_q, capture_residual=True)
            base_rows = [_row(i, t) for i, t in enumerate(base.texts)]
            cell_rows = []
            for j in range(k):
                run = reasoner.run(base_q, edits=[ThoughtEdit(j, "residual", "patch", source.thought_residual[:, j])])
                cell_rows += [{"cell_id": f"ct_{j}", **_row(i, t)} for i, t in enumerate(run.texts)]
            writer.write_part(dataset_id, 0, base_rows, cell_rows)
        entry: dict[str, Any] = {}
        for name, model in _causal_models(CTSettings(n_ops=n_ops)).items():
            scores = compute_interchange_scores(writer.results(), model, datasets, [[s] for s in CT_SLOTS], ct_checker)
            table = scores.pooled()
            floors = _floors(writer, model, datasets)
            diagonal = {s: float(table[(table.target_variables == s) & (table.cell_id == s)]["accuracy"].iloc[0])
                        for s in CT_SLOTS[:k]}
            entry[name] = {
                "causal_model": model.id,
                "iia": {f"{r.target_variables}@{r.cell_id}": round(float(r.accuracy), 4) for r in table.itertuples()},
                "diagonal": diagonal,
                "floor": floors,
                "mean_diagonal_minus_floor": float(np.mean([diagonal[s] - floors[s] for s in diagonal])),
                "verdicts": _verdicts(scores),
            }
        entry["base_accuracy"] = {r.dataset_id: float(r.accuracy) for r in scores.base_accuracy.itertuples()}
        results["n_ops"][str(n_ops)] = entry
    atomic_write_json(out / "ct_patching" / "ct_scores.json", results)
    return results


def _row(i: int, text: str) -> dict[str, Any]:
    return {"example_index": i, "output_text": text, "output_token_ids": [], "topk_token_ids": [], "topk_logits": []}


def _floors(writer: RawResultsWriter, model: Any, datasets: dict[str, Any]) -> dict[str, float]:
    """Per slot: share of unpatched outputs that already equal the slot's interchange label."""
    results = writer.results()
    hits: dict[str, list[bool]] = {s: [] for s in CT_SLOTS}
    for dataset_id, ds in datasets.items():
        base = results.base_outputs(dataset_id).set_index("example_index")["output_text"]
        for i, e in enumerate(ds.to_list()):
            for slot in CT_SLOTS:
                label = model.run_interchange(e["input"], {slot: e["counterfactual_inputs"][0]})["raw_output"]
                hits[slot].append(ct_checker(base[i], label))
    return {s: float(np.mean(v)) for s, v in hits.items()}


# ---------------------------------------------------------------------------- main
def summary_markdown(acc: dict, tax: dict, sens: dict, ct: dict | None) -> str:
    lines = ["# CT-position study", "", "| condition | accuracy | 95% CI | top error (share) | significant category changes |",
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
    if ct:
        lines += ["", "CT causal graph on whole-position patches (diagonal IIA: slot ct_j scored on the patch at CT_j; floor = unpatched run on the same labels):", ""]
        for n_ops, entry in ct["n_ops"].items():
            for name, r in entry.items():
                if name == "base_accuracy":
                    continue
                lines.append(f"- {n_ops} ops, {name} ({r['causal_model']}; mean IIA − floor "
                             f"{r['mean_diagonal_minus_floor']:+.2f}): " + ", ".join(
                                 f"{s} {v:.2f} (floor {r['floor'][s]:.2f})" for s, v in r["diagonal"].items()))
                verdicts = {k: v for k, v in r["verdicts"].items() if k != "rule"}
                lines.append(f"  verdicts (paired test vs the unpatched run, Holm): " + ", ".join(
                    f"{slot} {v['grade']}" + (f" at {v['cell_id']} (effect {v['effect']:+.2f})"
                                              if v["grade"] in ("full", "partial") else "")
                    for slot, v in verdicts.items()))
    return "\n".join(lines) + "\n"


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Run everything; returns the accuracy table, taxonomy summary and sensitivity report."""
    torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    reasoner = load_reasoner(cfg)
    problems = load_problems(cfg)
    rows = run_condition(reasoner, problems, "baseline", cfg.batch_size)
    for j in range(reasoner.config.num_thoughts):
        rows += run_condition(reasoner, problems, f"block_ct{j}", cfg.batch_size,
                              attention_ops=block_thoughts([j], cfg.layers, cfg.heads))
    frame = pd.DataFrame(rows)
    write_predictions(frame, out)
    acc = accuracy_table(frame)
    atomic_write_json(out / "accuracy.json", acc)
    report = taxonomy_report(frame, n_boot=cfg.n_boot, seed=cfg.seed)
    summary = taxonomy_summary(report)
    atomic_write_json(out / "taxonomy.json", report)
    atomic_write_json(out / "taxonomy_summary.json", summary)
    plot_taxonomy(report, str(out / "taxonomy.png"))
    sens = sensitivity(reasoner, problems, frame, out)
    ct = None
    if cfg.patching and cfg.gsm8k is None and reasoner.config.num_thoughts == len(CT_SLOTS):
        ct = ct_patching(reasoner, cfg, out)
    (out / "summary.md").write_text(summary_markdown(acc, summary, sens, ct))
    return {"accuracy": acc, "taxonomy": summary, "sensitivity": sens, "ct_patching": ct}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--organism-dir", type=Path)
    parser.add_argument("--codi-checkpoint", type=Path, help="folder with the CODI safetensors file")
    parser.add_argument("--codi-base", help="base model of the checkpoint (hub name or local folder)")
    parser.add_argument("--codi-masked", action="store_true", help="mask padding in latent/decoding steps")
    parser.add_argument("--gsm8k", type=Path, help="GSM8K-format JSONL (question, answer with '#### N')")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--n-problems", type=int, default=600)
    parser.add_argument("--style", default=None, help="generated problems: compact (organism) or words")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--layers", type=int, nargs="*")
    parser.add_argument("--heads", type=int, nargs="*")
    parser.add_argument("--no-patching", action="store_true")
    parser.add_argument("--patching-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    style = args.style or ("words" if args.codi_checkpoint else "compact")
    cfg = StudyConfig(out=args.out, organism_dir=args.organism_dir, codi_checkpoint=args.codi_checkpoint,
                      codi_base=args.codi_base, codi_masked=args.codi_masked, gsm8k=args.gsm8k, limit=args.limit,
                      n_problems=args.n_problems, style=style, batch_size=args.batch_size, layers=args.layers or None,
                      heads=args.heads or None, patching=not args.no_patching, patching_size=args.patching_size,
                      device=args.device, seed=args.seed)
    result = run_study(cfg)
    print((Path(cfg.out) / "summary.md").read_text())
    del result


if __name__ == "__main__":
    main()
