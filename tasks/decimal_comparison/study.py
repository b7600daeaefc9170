"""The decimal comparison study end to end: why a model says 9.11 > 9.8 in one prompt format and
not in another, and which component is causally responsible.

    python -m tasks.decimal_comparison.study                       # the shipped organism, CPU, minutes
    python -m tasks.decimal_comparison.study --quick               # one pair per format, seconds
    python -m tasks.decimal_comparison.study --model meta-llama/Llama-3.1-8B-Instruct --device cuda --dtype bfloat16

Steps (each writes extracted data under ``<out>/data/`` and raw results under ``<out>/raw/``):
1. bug rate per format (correct / buggy / unparseable, Wilson CIs, broken down by stratum);
2. layer × component patching (attention output, MLP output, block output) at role-matched
   positions from the correct format into each buggy format (fix rate) and back (break rate), with
   floors (the unpatched run's rate);
3. generalisation of the best cells to held-out pairs;
4. attention analysis (answer position -> decimals vs format tokens, entropy, differing heads);
5. attention transplantation (layers, single heads) both ways; head-subset sweeps;
6. head ablation (zero, mean) and MLP neuron ablation;
7. numeric vs fraction-as-integer causal models scored on the patching results;
8. figures (``figures.py``) and ``summary.md`` / ``summary.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from causal.interchange_scores import wilson_interval
from causal.verdicts import test_summary, verdicts_from_per_example
from causal.results import atomic_write_json
from tasks.decimal_comparison.answers import OUTCOMES, classify_answer
from tasks.decimal_comparison.formats import CORRECT_FORMAT, FORMATS, parse_format_option
from tasks.decimal_comparison.organism import ORGANISM_DIR
from tasks.decimal_comparison.pairs import DecimalPair, make_pair, sample_pairs

ORGANISM = "organism"
COMPONENTS: tuple[str, ...] = ("attention_output", "mlp_output", "block_output")


class StudyConfig(BaseModel):
    """Settings of one study run (recorded in ``summary.json``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = ORGANISM
    out: str | None = None
    device: str | None = None
    dtype: str | None = None
    chat: bool = False
    formats: list[str] = ["simple", "qa", "chat"]
    correct_format: str = CORRECT_FORMAT
    buggy_formats: list[str] | None = None  # None: the formats whose bug rate is >= bug_threshold
    bug_threshold: float = 0.5
    n_bug: int = Field(100, gt=0)
    n_patch: int = Field(48, gt=0)
    n_general: int = Field(100, gt=0)
    n_attention: int = Field(32, gt=0)
    seed: int = 0
    split: str = "heldout"
    layers: list[int] | None = None
    roles: list[str] = ["matched", "x", "y", "qmark", "last"]
    transplant_layers: list[int] | None = None
    subset_draws: int = 3
    subset_layer: int | None = None  # None: the layer whose whole-layer transplant fixes most
    subset_pools: list[str] = ["all", "even", "odd"]
    subset_modes: list[str] = ["transplant", "patch", "block"]
    success_threshold: float = 0.8
    ablation_layers: list[int] | None = None  # None: the two layers whose attention-output patch fixes most
    neuron_layer: int | None = None  # None: the layer whose MLP-output patch fixes most
    neurons: str | None = None
    max_new_tokens: int | None = None
    batch_size: int = 64
    max_rows: int = 2048
    quick: bool = False
    steps: list[str] = ["bug_rate", "patching", "generalisation", "attention", "transplant", "ablation",
                        "causal_models", "figures"]


# ---------------------------------------------------------------------------------------- helpers
def rate(k: int, n: int) -> dict[str, Any]:
    """``{"k", "n", "rate", "ci_low", "ci_high"}`` with a 95% Wilson interval."""
    low, high = wilson_interval(k, n) if n else (float("nan"), float("nan"))
    return {"k": int(k), "n": int(n), "rate": (k / n) if n else None, "ci_low": low if n else None,
            "ci_high": high if n else None}


def fmt_rate(r: dict[str, Any]) -> str:
    if not r or r.get("rate") is None:
        return "n/a"
    return f"{r['rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] ({r['k']}/{r['n']})"


def slug(model: str) -> str:
    return ORGANISM if model == ORGANISM else re.sub(r"[^A-Za-z0-9_.-]+", "_", model.strip("/"))


def model_path(model: str) -> str:
    return str(ORGANISM_DIR) if model == ORGANISM else model


def load_pipeline(cfg: StudyConfig):
    from experiments.pipeline import LMPipeline

    new_tokens = cfg.max_new_tokens or (7 if cfg.model == ORGANISM else 12)
    return LMPipeline(model_path(cfg.model), max_new_tokens=new_tokens, device=cfg.device, dtype=cfg.dtype,
                      use_chat_template=cfg.chat)


def setting(pipeline, pair: DecimalPair, fmt: str) -> dict[str, Any]:
    from tasks.decimal_comparison.causal_models import make_setting

    return make_setting(pair.x, pair.y, fmt, pipeline.tokenizer)


def outcome_of(text: str, x: str, y: str) -> str:
    pair = make_pair(x, y)
    return classify_answer(text, x, y, pair.correct, pair.buggy)


def outcome_rates(texts: Sequence[str], pairs: Sequence[DecimalPair]) -> dict[str, dict[str, Any]]:
    outcomes = [classify_answer(t, p.x, p.y, p.correct, p.buggy) for t, p in zip(texts, pairs)]
    return {o: rate(sum(1 for v in outcomes if v == o), len(outcomes)) for o in OUTCOMES}


def generate_texts(pipeline, prompts: list[dict[str, Any]], batch_size: int = 64) -> list[str]:
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        gen = pipeline.generate(prompts[start:start + batch_size])
        out += pipeline.dump([ids[:n] for ids, n in zip(gen.token_ids.tolist(), gen.lengths)])
    return out


# ---------------------------------------------------------------------------------------- 1. bug rate
def quick_check(pipeline, formats: Iterable[str], x: str = "9.8", y: str = "9.11") -> dict[str, Any]:
    """One pair per format: the answer text and its outcome (seconds, even for an 8B model)."""
    pair = make_pair(x, y)
    prompts = [setting(pipeline, pair, f) for f in formats]
    texts = generate_texts(pipeline, prompts)
    return {f: {"prompt": p["raw_input"], "answer": t, "outcome": classify_answer(t, x, y, pair.correct, pair.buggy)}
            for f, p, t in zip(formats, prompts, texts)}


def bug_rates(pipeline, formats: Sequence[str], n: int, seed: int, split: str, batch_size: int) -> dict[str, Any]:
    """Per format: correct / buggy / unparseable rates on ``n`` disagreeing pairs, by stratum, plus the
    accuracy on control pairs (different integer parts) and a few example answers."""
    pairs = sample_pairs(n, seed=seed, split=split)
    controls = sample_pairs(max(10, n // 2), seed=seed, kind="control", split=split)
    out: dict[str, Any] = {"n_pairs": n, "seed": seed, "split": split, "formats": {}}
    for fmt in formats:
        texts = generate_texts(pipeline, [setting(pipeline, p, fmt) for p in pairs], batch_size)
        ctexts = generate_texts(pipeline, [setting(pipeline, p, fmt) for p in controls], batch_size)
        outcomes = [classify_answer(t, p.x, p.y, p.correct, p.buggy) for t, p in zip(texts, pairs)]
        by: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for p, o in zip(pairs, outcomes):
            by["larger"][p.larger].append(o)
            by["int_part"]["0-9" if p.int_x < 10 else "10-20"].append(o)
            by["frac_lengths"][f"{p.frac_len_x}{p.frac_len_y}"].append(o)
        out["formats"][fmt] = {
            **{o: rate(outcomes.count(o), len(outcomes)) for o in OUTCOMES},
            "control_correct": rate(sum(classify_answer(t, p.x, p.y, p.correct, p.buggy) == "correct"
                                        for t, p in zip(ctexts, controls)), len(controls)),
            "breakdown": {key: {group: {"buggy": rate(v.count("buggy"), len(v)), "correct": rate(v.count("correct"), len(v))}
                                for group, v in sorted(groups.items())} for key, groups in by.items()},
            "examples": [{"x": p.x, "y": p.y, "answer": t, "outcome": o}
                         for p, t, o in list(zip(pairs, texts, outcomes))[:5]],
        }
    return out


# ---------------------------------------------------------------------------------------- datasets
def cross_format_dataset(pipeline, pairs: Sequence[DecimalPair], base_fmt: str, source_fmt: str, id: str):
    """Pairs (base in ``base_fmt``, counterfactual = the same numbers in ``source_fmt``)."""
    from causal.counterfactual_dataset import CounterfactualDataset

    return CounterfactualDataset.from_examples(
        [{"input": setting(pipeline, p, base_fmt), "counterfactual_inputs": [setting(pipeline, p, source_fmt)]}
         for p in pairs], id=id)


def direction_datasets(pipeline, pairs, correct: str, buggy: Sequence[str]) -> dict[str, Any]:
    """``fix.<F>`` (base F, source correct format) and ``break.<F>`` (base correct, source F)."""
    out = {}
    for fmt in buggy:
        out[f"fix.{fmt}"] = cross_format_dataset(pipeline, pairs, fmt, correct, f"fix.{fmt}")
        out[f"break.{fmt}"] = cross_format_dataset(pipeline, pairs, correct, fmt, f"break.{fmt}")
    return out


def target_outcome(dataset_id: str) -> str:
    """A ``fix.`` cell succeeds when the answer becomes correct; a ``break.`` cell when it becomes buggy."""
    return "correct" if dataset_id.startswith("fix.") else "buggy"


def run_cells(pipeline, cells, datasets: dict[str, Any], folder: Path, exp_id: str, cfg: StudyConfig) -> list[dict]:
    """Run ``cells`` on ``datasets`` (resumable in ``folder``); one row per (dataset, cell) with the
    success rate (``fix.`` -> correct, ``break.`` -> buggy), its CI and the floor (unpatched base run)."""
    from experiments.intervention_experiment import InterventionExperiment

    experiment = InterventionExperiment(pipeline, cells, {"id": exp_id, "batch_size": cfg.batch_size,
                                                          "max_rows_per_forward": cfg.max_rows})
    raw = experiment.perform_interventions(datasets, results_dir=folder, verbose=True)
    rows = []
    pairs: list[pd.DataFrame] = []  # per pair: patched / unpatched reached the target outcome (for the verdicts)
    addresses = raw.cell_addresses().set_index("cell_id")
    for did, dataset in datasets.items():
        xy = {i: (ex["input"]["x"], ex["input"]["y"]) for i, ex in enumerate(dataset)}
        want = target_outcome(did)
        base = raw.base_outputs(did)
        base_hit = {int(i): outcome_of(t, *xy[i]) == want for t, i in zip(base["output_text"], base["example_index"])}
        floor_k = sum(base_hit.values())
        cells_out = raw.intervened_outputs(did)
        for cell_id, frame in cells_out.groupby("cell_id", sort=False):
            outcomes = [outcome_of(t, *xy[i]) for t, i in zip(frame["output_text"], frame["example_index"])]
            pairs.append(pd.DataFrame({"target_variables": did.split(".", 1)[0], "dataset_id": did, "cell_id": cell_id,
                                       "correct": [o == want for o in outcomes],
                                       "base_correct_on_label": [base_hit[int(i)] for i in frame["example_index"]]}))
            addr = addresses.loc[cell_id]
            rows.append({
                "dataset_id": did, "direction": did.split(".", 1)[0], "format": did.split(".", 1)[1],
                "cell_id": cell_id, "layer": int(addr["layer"]), "component": addr["component"],
                "head": None if addr["head"] is None or str(addr["head"]) == "<NA>" else int(addr["head"]),
                "position_id": addr["position_id"], "n_units": int(addr["n_units"]),
                "success": rate(outcomes.count(want), len(outcomes)),
                "floor": rate(floor_k, len(base)),
                "outcomes": {o: outcomes.count(o) for o in OUTCOMES},
            })
    if pairs:  # the paired verdict of each (dataset, cell), corrected across the cells of its dataset
        tests = verdicts_from_per_example(exp_id, pd.concat(pairs, ignore_index=True)).tests.set_index(["scope", "cell_id"])
        for row in rows:
            row["verdict"] = test_summary(tests.loc[(row["dataset_id"], row["cell_id"])].to_dict()
                                          | {"cell_id": row["cell_id"]})
    return rows


def best_rows(rows: list[dict], direction: str = "fix", key: Callable[[dict], Any] | None = None, top: int = 3) -> list[dict]:
    """Cells ranked by mean success over formats in ``direction`` (optionally grouped by ``key``)."""
    agg: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["direction"] == direction:
            agg[r["cell_id"]].append(r)
    ranked = sorted(agg.values(), key=lambda rs: (-np.mean([r["success"]["rate"] for r in rs]), rs[0]["layer"]))
    return [{"cell_id": rs[0]["cell_id"], "layer": rs[0]["layer"], "component": rs[0]["component"],
             "position_id": rs[0]["position_id"], "head": rs[0]["head"],
             "mean_success": float(np.mean([r["success"]["rate"] for r in rs])),
             "per_format": {r["format"]: {"success": r["success"], "floor": r["floor"], "verdict": r.get("verdict")}
                            for r in rs}}
            for rs in ranked[:top]]


# ---------------------------------------------------------------------------------------- 2-3. patching
def patching_cells(pipeline, layers: Sequence[int], roles: Sequence[str]):
    from experiments.intervention_engine import Cell
    from experiments.model_units import ModelUnit
    from tasks.decimal_comparison.token_positions import role_positions

    positions = role_positions(pipeline, roles)
    return [Cell(f"{comp}.L{layer}@{pos.id}", [ModelUnit(layer, comp, pos)])
            for comp in COMPONENTS for layer in layers for pos in positions]


def cells_by_ids(pipeline, ids: Sequence[str], roles: Sequence[str]):
    wanted = set(ids)
    layers = sorted({int(re.search(r"\.L(\d+)@", i).group(1)) for i in ids})
    return [c for c in patching_cells(pipeline, layers, roles) if c.cell_id in wanted]


# ---------------------------------------------------------------------------------------- 4. attention
def attention_analysis(pipeline, pairs: Sequence[DecimalPair], formats: Sequence[str], correct: str) -> dict[str, Any]:
    """From the last prompt position, per format, layer and head: attention mass on the decimals' tokens,
    on the format's own tokens (no counterpart in other formats), on BOS; entropy; the heads whose
    decimal mass differs most from the correct format; token-level maps for 9.8 vs 9.11."""
    import torch

    from experiments.attention_control import RecordAttention, attention_control
    from tasks.decimal_comparison.token_positions import adds_bos, role_indices

    layers = list(range(pipeline.num_layers))
    bos = adds_bos(pipeline)
    stats: dict[str, dict[str, np.ndarray]] = {}
    for fmt in formats:
        settings = [setting(pipeline, p, fmt) for p in pairs]
        batch = pipeline.load(settings)
        width = batch.input_ids.shape[1]
        with torch.no_grad(), attention_control(pipeline.model, [RecordAttention(layers, query_positions=[width - 1])]) as ctl:
            pipeline.model(**batch.model_inputs(), use_cache=False)
        dec = np.zeros((len(layers), pipeline.num_heads))
        own = np.zeros_like(dec)
        first = np.zeros_like(dec)
        ent = np.zeros_like(dec)
        for b, s in enumerate(settings):
            off = batch.pad_offsets[b]
            n = batch.lengths[b]
            decimals = [off + i for i in role_indices(pipeline, s, "x") + role_indices(pipeline, s, "y")]
            matched = set(role_indices(pipeline, s, "matched")) | ({0} if bos else set())
            span = set(range(*_question_token_range(pipeline, s)))
            own_cols = [off + i for i in range(n) if i not in matched and i not in span]
            for li, layer in enumerate(layers):
                p = ctl.get(layer).probs[b, :, 0].float().cpu().numpy()  # (H, K)
                dec[li] += p[:, decimals].sum(-1)
                own[li] += p[:, own_cols].sum(-1) if own_cols else 0
                first[li] += p[:, off]
                q = np.clip(p[:, off:], 1e-12, 1)
                ent[li] += -(q * np.log(q)).sum(-1)
        k = len(settings)
        stats[fmt] = {"decimals": dec / k, "format_tokens": own / k, "first": first / k, "entropy": ent / k}
    diffs = []
    for fmt in formats:
        if fmt == correct:
            continue
        delta = stats[fmt]["decimals"] - stats[correct]["decimals"]
        for li, layer in enumerate(layers):
            for h in range(pipeline.num_heads):
                diffs.append({"format": fmt, "layer": layer, "head": h, "delta_decimals": float(delta[li, h])})
    diffs.sort(key=lambda d: -abs(d["delta_decimals"]))
    tokens = {}
    probe = make_pair("9.8", "9.11")
    for fmt in formats:
        s = setting(pipeline, probe, fmt)
        batch = pipeline.load([s])
        with torch.no_grad(), attention_control(pipeline.model, [RecordAttention(layers)]) as ctl:
            pipeline.model(**batch.model_inputs(), use_cache=False)
        ids = pipeline.tokenize_one(s)["input_ids"]
        tokens[fmt] = {"tokens": pipeline.tokenizer.convert_ids_to_tokens(ids),
                       "last_query_by_layer_head": [ctl.get(l).probs[0, :, -1].float().cpu().numpy().tolist() for l in layers]}
    return {
        "layers": layers, "n_pairs": len(pairs),
        "per_format": {f: {k: v.tolist() for k, v in d.items()} for f, d in stats.items()},
        "top_differing_heads": diffs[:20],
        "token_maps": tokens,
    }


def _question_token_range(pipeline, s: dict[str, Any]) -> tuple[int, int]:
    """Token range of the whole question (shared text in every format)."""
    from experiments.token_positions import char_span_token_indices
    from tasks.decimal_comparison.formats import question_span

    start, end = question_span(s["raw_input"], s["x"], s["y"])
    hits = char_span_token_indices(pipeline, s, start, end)
    return hits[0], hits[-1] + 1


# ---------------------------------------------------------------------------------------- 5. transplant
def transplant_cells(pipeline, layers: Sequence[int], per_head: bool = True):
    from experiments.intervention_engine import Cell
    from experiments.model_units import AttentionPattern
    from tasks.decimal_comparison.token_positions import key_roles, role_position

    queries = role_position(pipeline, "matched")
    keys = key_roles(pipeline)
    cells = []
    for layer in layers:
        cells.append(Cell(f"transplant.L{layer}.all", [AttentionPattern(layer, queries)], kind="attention_transplant",
                          key_roles=keys))
        if per_head:
            for h in range(pipeline.num_heads):
                cells.append(Cell(f"transplant.L{layer}.h{h}", [AttentionPattern(layer, queries, head=h)],
                                  kind="attention_transplant", key_roles=keys))
    return cells


def blocking_cells(pipeline, layers: Sequence[int], per_head: bool = True):
    """Block attention to the format's own tokens (``format`` role) from every later query, in the prompt
    and every decoding step, at one layer (all heads, or one head)."""
    from experiments.intervention_engine import Cell
    from experiments.model_units import AttentionPattern
    from tasks.decimal_comparison.token_positions import role_position

    keys = role_position(pipeline, "format")
    cells = []
    for layer in layers:
        cells.append(Cell(f"block.L{layer}.all", [AttentionPattern(layer, keys)], kind="attention_block"))
        if per_head:
            for h in range(pipeline.num_heads):
                cells.append(Cell(f"block.L{layer}.h{h}", [AttentionPattern(layer, keys, head=h)], kind="attention_block"))
    return cells


def subset_cells(pipeline, layer: int, draws: int, seed: int, mode: str,
                 pools: Sequence[str] = ("all", "even", "odd")):
    """Head subsets of ``layer``: ``draws`` random k-subsets per k (all of them when fewer exist) from
    each pool of heads (``all``, ``even``-indexed, ``odd``-indexed); ``mode`` "transplant" (attention
    patterns at the matched queries) or "patch" (head outputs at the matched positions)."""
    from experiments.intervention_engine import Cell
    from experiments.model_units import AttentionHead, AttentionPattern
    from tasks.decimal_comparison.token_positions import key_roles, role_position

    queries = role_position(pipeline, "matched")
    keys = key_roles(pipeline)
    format_keys = role_position(pipeline, "format")
    heads = list(range(pipeline.num_heads))
    known = {"all": heads, "even": heads[0::2], "odd": heads[1::2]}
    unknown = [p for p in pools if p not in known]
    if unknown:
        raise ValueError(f"unknown head pools {unknown}; known: {sorted(known)}")
    rng = random.Random(f"subsets-{seed}-{layer}-{mode}")
    cells = []
    for pool_name in pools:
        pool = known[pool_name]
        for k in range(1, len(pool) + 1):
            if _n_choose(len(pool), k) <= draws:
                subsets = [tuple(c) for c in itertools.combinations(pool, k)]
            else:
                found: set[tuple[int, ...]] = set()
                while len(found) < draws:
                    found.add(tuple(sorted(rng.sample(pool, k))))
                subsets = sorted(found)
            for subset in subsets:
                name = f"{mode}.L{layer}.{pool_name}.k{k}.h" + "-".join(map(str, subset))
                if mode == "transplant":
                    cells.append(Cell(name, [AttentionPattern(layer, queries, head=h) for h in subset],
                                      kind="attention_transplant", key_roles=keys))
                elif mode == "patch":
                    cells.append(Cell(name, [AttentionHead(layer, h, queries) for h in subset]))
                elif mode == "block":
                    cells.append(Cell(name, [AttentionPattern(layer, format_keys, head=h) for h in subset],
                                      kind="attention_block"))
                else:
                    raise ValueError(f"mode must be 'transplant', 'patch' or 'block', got {mode!r}")
    return cells


def _n_choose(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def subset_summary(rows: list[dict], threshold: float) -> list[dict]:
    """Per (mode, pool, k, direction): subsets drawn, mean success and the share with success >= threshold."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        mode, _layer, pool, k = r["cell_id"].split(".")[:4]
        groups[(mode, pool, int(k[1:]), r["direction"], r["format"])].append(r)
    out = []
    for (mode, pool, k, direction, fmt), rs in sorted(groups.items()):
        rates = [r["success"]["rate"] for r in rs]
        out.append({"mode": mode, "pool": pool, "k": k, "direction": direction, "format": fmt, "subsets": len(rs),
                    "mean_success": float(np.mean(rates)), "min_success": float(np.min(rates)),
                    "share_above_threshold": float(np.mean([x >= threshold for x in rates])),
                    "floor": rs[0]["floor"]["rate"]})
    return out


# ---------------------------------------------------------------------------------------- 6. ablations
def same_format_dataset(pipeline, pairs, fmt: str, id: str):
    from causal.counterfactual_dataset import CounterfactualDataset

    return CounterfactualDataset.from_examples(
        [{"input": setting(pipeline, p, fmt), "counterfactual_inputs": [setting(pipeline, p, fmt)]} for p in pairs], id=id)


def head_means(pipeline, layers: Sequence[int], prompts: list[dict[str, Any]]) -> dict[int, Any]:
    """Per layer: (H, d_head) mean head output over every real token of ``prompts``."""
    import torch

    from experiments.intervention_engine import InterventionEngine
    from experiments.sites import Site

    engine = InterventionEngine(pipeline)
    batch = pipeline.load(prompts)
    sites = [Site(l, "head_attention_value_output") for l in layers]
    with torch.no_grad():
        acts = engine.backend.collect(sites, batch.model_inputs())
    mask = batch.attention_mask.bool()
    return {site.layer: acts[site][mask].float().mean(0) for site in sites}  # (H, d)


def ablation_cells(pipeline, layers: Sequence[int], means: dict[int, Any]):
    from experiments.intervention_engine import Cell
    from experiments.model_units import AttentionHead
    from tasks.decimal_comparison.token_positions import role_position

    everywhere = role_position(pipeline, "all")
    cells = []
    for layer in layers:
        for h in range(pipeline.num_heads):
            cells.append(Cell(f"zero.L{layer}.h{h}", [AttentionHead(layer, h, everywhere)], kind="zero_ablation"))
            cells.append(Cell(f"mean.L{layer}.h{h}", [AttentionHead(layer, h, everywhere)], kind="mean_ablation",
                              ablation_values=[means[layer][h]], parameters={"mean_over": "all tokens, every format"}))
    return cells


def neuron_study(pipeline, pairs, correct: str, buggy: Sequence[str], layer: int, given: dict[int, list[int]] | None,
                 batch_size: int) -> dict[str, Any]:
    """Ablate (zero) MLP neurons and measure fix / break rates. Without a given list: the neurons of
    ``layer`` whose mean activation at the last position differs most between the buggy formats and
    the correct one, top k for k = 1, 2, 4, ... ."""
    import torch

    from tasks.decimal_comparison.neurons import ablate_neurons, neuron_activations

    def acts(fmt: str) -> np.ndarray:
        batch = pipeline.load([setting(pipeline, p, fmt) for p in pairs])
        return neuron_activations(pipeline.model, layer, batch.model_inputs())[:, -1].float().cpu().numpy().mean(0)

    candidates: list[dict[int, list[int]]] = []
    ranking: list[int] = []
    if given:
        candidates = [given]
        layer = next(iter(given))
    else:
        with torch.no_grad():
            diff = np.mean([acts(f) for f in buggy], axis=0) - acts(correct)
        ranking = [int(i) for i in np.argsort(-np.abs(diff))]
        k = 1
        while k <= min(len(ranking), 64):
            candidates.append({layer: ranking[:k]})
            k *= 2
    results = []
    for neurons in candidates:
        entry: dict[str, Any] = {"neurons": {str(l): v for l, v in neurons.items()},
                                 "n_neurons": sum(len(v) for v in neurons.values())}
        with ablate_neurons(pipeline.model, neurons):
            for fmt in buggy:
                texts = generate_texts(pipeline, [setting(pipeline, p, fmt) for p in pairs], batch_size)
                entry[f"fix.{fmt}"] = outcome_rates(texts, pairs)["correct"]
            texts = generate_texts(pipeline, [setting(pipeline, p, correct) for p in pairs], batch_size)
            entry["correct_format_still_correct"] = outcome_rates(texts, pairs)["correct"]
        results.append(entry)
    floors = {f"fix.{fmt}": outcome_rates(generate_texts(pipeline, [setting(pipeline, p, fmt) for p in pairs], batch_size),
                                          pairs)["correct"] for fmt in buggy}
    return {"layer": layer, "given": bool(given), "ranking_top": ranking[:16], "results": results, "floors": floors}


# ---------------------------------------------------------------------------------------- 7. causal models
def score_causal_models(folder: Path, datasets: dict[str, Any]) -> list[dict[str, Any]]:
    """Numeric vs fraction-as-integer hypotheses on the patching raw results: interchange of
    ``frac_cmp`` from the counterfactual (same numbers, other format), per dataset (= per format)."""
    from causal.interchange_scores import compute_interchange_scores
    from tasks.decimal_comparison.causal_models import build_numeric_model, build_whole_number_fraction_model
    from tasks.decimal_comparison.checker import decimal_checker

    out = []
    for model in (build_numeric_model(), build_whole_number_fraction_model()):
        scores = compute_interchange_scores(folder, model, datasets, [["frac_cmp"]], decimal_checker)
        scores.save(folder.parent.parent / "scores" / f"{model.id}.json")
        best = scores.table.sort_values("accuracy", ascending=False).groupby("dataset_id", sort=False).head(1)
        for row in best.itertuples(index=False):
            base = scores.base_accuracy.set_index("dataset_id").loc[row.dataset_id]
            out.append({"causal_model": model.id, "dataset_id": row.dataset_id, "best_cell": row.cell_id,
                        "accuracy": float(row.accuracy), "ci_low": float(row.ci_low), "ci_high": float(row.ci_high),
                        "n": int(row.n), "base_accuracy": float(base["accuracy"])})
    return out


# ---------------------------------------------------------------------------------------- driver
def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Run the steps of ``cfg.steps``; returns (and writes) the summary."""
    import torch

    torch.set_num_threads(1 if cfg.device in (None, "cpu") else torch.get_num_threads())
    out = Path(cfg.out) if cfg.out else Path("results") / "decimal" / slug(cfg.model)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pipeline = load_pipeline(cfg)
    formats = [f for f in cfg.formats if not (cfg.chat and FORMATS[f].chat)]
    if cfg.correct_format not in formats:
        raise SystemExit(f"the correct format {cfg.correct_format!r} must be among --formats {formats}")
    summary: dict[str, Any] = {"config": cfg.model_dump(), "model": pipeline.name, "formats": formats}
    summary["quick_check"] = quick_check(pipeline, formats)
    print(json.dumps(summary["quick_check"], indent=1))
    if cfg.quick:
        atomic_write_json(out / "quick_check.json", summary["quick_check"])
        return summary

    bug = bug_rates(pipeline, formats, cfg.n_bug, cfg.seed, cfg.split, cfg.batch_size)
    atomic_write_json(data / "bug_rate.json", bug)
    summary["bug_rate"] = {f: {o: bug["formats"][f][o] for o in OUTCOMES} for f in formats}
    buggy = cfg.buggy_formats or [f for f in formats if f != cfg.correct_format
                                  and bug["formats"][f]["buggy"]["rate"] >= cfg.bug_threshold]
    summary["buggy_formats"] = buggy
    print("bug rates:", {f: round(bug["formats"][f]["buggy"]["rate"], 3) for f in formats}, "buggy formats:", buggy)
    if not buggy or (cfg.buggy_formats is None and bug["formats"][cfg.correct_format]["correct"]["rate"] < 0.5):
        summary["note"] = "no format pair with a correct and a buggy format: nothing to localise"
        _finish(out, summary, cfg, start)
        return summary

    layers = cfg.layers if cfg.layers is not None else list(range(pipeline.num_layers))
    pairs = sample_pairs(cfg.n_patch, seed=cfg.seed + 1, split=cfg.split)
    datasets = direction_datasets(pipeline, pairs, cfg.correct_format, buggy)
    rows: list[dict] = []
    if "patching" in cfg.steps:
        rows = run_cells(pipeline, patching_cells(pipeline, layers, cfg.roles), datasets, out / "raw" / "patching",
                         "patching", cfg)
        atomic_write_json(data / "patching.json", {"rows": rows, "layers": layers, "components": list(COMPONENTS),
                                                   "roles": cfg.roles, "n_pairs": len(pairs)})
        summary["patching_best_fix"] = best_rows(rows, "fix", top=5)
        summary["patching_best_break"] = best_rows(rows, "break", top=5)
        summary["patching_best_per_component"] = {
            comp: best_rows([r for r in rows if r["component"] == comp and r["position_id"] == "matched"], "fix", top=1)
            for comp in COMPONENTS}
        if "causal_models" in cfg.steps:
            summary["causal_models"] = score_causal_models(out / "raw" / "patching", datasets)
            atomic_write_json(data / "causal_models.json", summary["causal_models"])

    if "generalisation" in cfg.steps and rows:
        top = [b["cell_id"] for b in summary["patching_best_fix"][:3]]
        held = sample_pairs(cfg.n_general, seed=cfg.seed + 2, split=cfg.split, exclude={(p.x, p.y) for p in pairs})
        gdatasets = direction_datasets(pipeline, held, cfg.correct_format, buggy)
        grows = run_cells(pipeline, cells_by_ids(pipeline, top, cfg.roles), gdatasets, out / "raw" / "generalisation",
                          "generalisation", cfg)
        atomic_write_json(data / "generalisation.json", {"rows": grows, "cells": top, "n_pairs": len(held)})
        summary["generalisation"] = [{"cell_id": r["cell_id"], "dataset_id": r["dataset_id"], "success": r["success"],
                                      "floor": r["floor"]} for r in grows]

    if "attention" in cfg.steps:
        att_pairs = sample_pairs(cfg.n_attention, seed=cfg.seed + 3, split=cfg.split)
        att = attention_analysis(pipeline, att_pairs, formats, cfg.correct_format)
        atomic_write_json(data / "attention.json", att)
        summary["attention_top_differing_heads"] = att["top_differing_heads"][:5]

    critical = _critical_layers(rows, layers, "attention_output")
    summary["critical_attention_layers"] = critical
    if "transplant" in cfg.steps:
        t_layers = cfg.transplant_layers if cfg.transplant_layers is not None else (
            layers if len(layers) <= 8 else critical[:3])
        trows = run_cells(pipeline, transplant_cells(pipeline, t_layers), datasets, out / "raw" / "transplant",
                          "transplant", cfg)
        brows = run_cells(pipeline, blocking_cells(pipeline, t_layers), datasets, out / "raw" / "blocking",
                          "blocking", cfg)
        whole = {l: max(np.mean([r["success"]["rate"] for r in trows + brows
                                 if r["cell_id"] == f"{kind}.L{l}.all" and r["direction"] == "fix"]) for kind in ("transplant", "block"))
                 for l in t_layers}
        best_layer = cfg.subset_layer if cfg.subset_layer is not None else max(t_layers, key=lambda l: (whole[l], -l))
        srows = []
        for mode in cfg.subset_modes:
            srows += run_cells(pipeline, subset_cells(pipeline, best_layer, cfg.subset_draws, cfg.seed, mode,
                                                      cfg.subset_pools), datasets,
                               out / "raw" / f"subsets_{mode}", f"subsets_{mode}", cfg)
        subsets = subset_summary(srows, cfg.success_threshold)
        atomic_write_json(data / "blocking.json", {"rows": brows, "layers": t_layers})
        summary["blocking_layers"] = {f"L{l}": {r["dataset_id"]: {"success": r["success"], "floor": r["floor"]}
                                                for r in brows if r["cell_id"] == f"block.L{l}.all"} for l in t_layers}
        summary["blocking_best_heads"] = best_rows([r for r in brows if not r["cell_id"].endswith(".all")], "fix", top=3)
        atomic_write_json(data / "transplant.json", {"rows": trows, "layers": t_layers, "subset_layer": best_layer,
                                                     "subset_rows": srows, "subsets": subsets,
                                                     "threshold": cfg.success_threshold})
        summary["transplant_layers"] = {f"L{l}": {r["dataset_id"]: {"success": r["success"], "floor": r["floor"]}
                                                  for r in trows if r["cell_id"] == f"transplant.L{l}.all"} for l in t_layers}
        summary["transplant_best_heads"] = best_rows([r for r in trows if not r["cell_id"].endswith(".all")], "fix", top=3)
        summary["subset_layer"] = best_layer
        summary["subsets"] = [s for s in subsets if s["direction"] == "fix"]

    if "ablation" in cfg.steps:
        a_layers = cfg.ablation_layers if cfg.ablation_layers is not None else critical[:2]
        ref = [setting(pipeline, p, f) for p in pairs[:32] for f in formats]
        means = head_means(pipeline, a_layers, ref)
        adatasets = {f"fix.{fmt}": same_format_dataset(pipeline, pairs, fmt, f"fix.{fmt}") for fmt in buggy}
        adatasets[f"break.{cfg.correct_format}"] = same_format_dataset(pipeline, pairs, cfg.correct_format,
                                                                     f"break.{cfg.correct_format}")
        arows = run_cells(pipeline, ablation_cells(pipeline, a_layers, means), adatasets, out / "raw" / "ablation",
                          "ablation", cfg)
        mlp_layer = cfg.neuron_layer if cfg.neuron_layer is not None else _critical_layers(rows, layers, "mlp_output")[0]
        from tasks.decimal_comparison.neurons import parse_neurons

        neurons = neuron_study(pipeline, pairs, cfg.correct_format, buggy, mlp_layer,
                               parse_neurons(cfg.neurons) if cfg.neurons else None, cfg.batch_size)
        atomic_write_json(data / "ablation.json", {"rows": arows, "layers": a_layers, "neurons": neurons})
        summary["head_ablation_best_fix"] = best_rows(arows, "fix", top=3)
        summary["head_ablation_best_break"] = best_rows(arows, "break", top=3)
        summary["neurons"] = neurons
    _finish(out, summary, cfg, start)
    return summary


def _critical_layers(rows: list[dict], layers: Sequence[int], component: str) -> list[int]:
    """Layers ranked by the fix rate of patching ``component`` at the matched positions."""
    if not rows:
        return list(layers)
    score = {l: np.mean([r["success"]["rate"] for r in rows if r["layer"] == l and r["component"] == component
                         and r["position_id"] == "matched" and r["direction"] == "fix"] or [0.0]) for l in layers}
    return sorted(layers, key=lambda l: (-score[l], l))


def _finish(out: Path, summary: dict[str, Any], cfg: StudyConfig, start: float) -> None:
    summary["seconds"] = round(time.time() - start, 1)
    atomic_write_json(out / "summary.json", summary)
    if "figures" in cfg.steps:
        from tasks.decimal_comparison.figures import make_figures

        summary["figures"] = make_figures(out)
    from tasks.decimal_comparison.report import write_summary_md

    write_summary_md(out, summary)
    atomic_write_json(out / "summary.json", summary)
    print(f"study written to {out} ({summary['seconds']} s)")


def parse_args(argv: list[str] | None = None) -> StudyConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=ORGANISM, help="hub name or local HF folder (default: the shipped organism)")
    p.add_argument("--out", default=None, help="study folder (default results/decimal/<model>)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--chat", action="store_true",
                   help="wrap every format in the tokenizer's chat template (the 'chat' format is then dropped)")
    p.add_argument("--formats", nargs="*", default=None, help="formats to study (default: simple qa chat + --format ones)")
    p.add_argument("--format", action="append", default=[], metavar="NAME=TEMPLATE",
                   help="add a format, e.g. --format 'terse={question} =' ({question} is the question)")
    p.add_argument("--buggy-formats", nargs="*", default=None, help="formats to localise (default: bug rate >= 0.5)")
    p.add_argument("--n-bug", type=int, default=100, help="pairs per format for the bug rate")
    p.add_argument("--n-patch", type=int, default=48, help="pairs for patching, transplantation, ablation")
    p.add_argument("--n-general", type=int, default=100, help="held-out pairs for generalisation")
    p.add_argument("--n-attention", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="heldout", choices=("heldout", "train", "any"))
    p.add_argument("--layers", type=int, nargs="*", default=None)
    p.add_argument("--roles", nargs="*", default=None, help="positions of the patching sweep")
    p.add_argument("--transplant-layers", type=int, nargs="*", default=None)
    p.add_argument("--subset-draws", type=int, default=3, help="random head subsets per size k")
    p.add_argument("--subset-layer", type=int, default=None, help="layer of the head-subset sweeps")
    p.add_argument("--subset-pools", nargs="*", default=None, help="head pools: all even odd")
    p.add_argument("--subset-modes", nargs="*", default=None, help="transplant, patch and/or block")
    p.add_argument("--ablation-layers", type=int, nargs="*", default=None, help="layers of the head ablations")
    p.add_argument("--neuron-layer", type=int, default=None, help="MLP layer whose neurons are ranked and ablated")
    p.add_argument("--neurons", default=None, help="MLP neurons to ablate, LAYER:N,N;LAYER:N (default: ranked)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-rows", type=int, default=2048, help="cells x pairs per forward (memory knob)")
    p.add_argument("--quick", action="store_true", help="only the one-pair check per format (seconds)")
    p.add_argument("--steps", nargs="*", default=None, help="subset of the study's steps")
    a = p.parse_args(argv)
    for option in a.format:
        parse_format_option(option)
    cfg = StudyConfig()
    values: dict[str, Any] = {k: v for k, v in vars(a).items() if k != "format" and v is not None}
    if a.formats is None:
        values["formats"] = cfg.formats + [o.split("=", 1)[0].strip() for o in a.format]
    return StudyConfig(**{k: v for k, v in values.items() if k in StudyConfig.model_fields})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_study(parse_args(argv))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
