"""The decimal comparison study's analyses, each a function of a pipeline (or of raw results) and its inputs:
bug rate per format, cross-format datasets, the success metric of a patch (``fix`` -> the answer becomes correct,
``break`` -> it becomes buggy, with floors and paired verdicts), cell builders for patching, attention
transplantation and blocking, head subsets and ablations, MLP-neuron ablation, the attention analysis.

The study runner calls them through the task's extra steps (``tasks/decimal_comparison/steps.py``); the notebook
``demos/06_decimal_comparison.ipynb`` calls them one by one.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from causal.interchange_scores import wilson_interval
from causal.verdicts import test_summary, verdicts_from_per_example
from tasks.decimal_comparison.answers import OUTCOMES, classify_answer
from tasks.decimal_comparison.pairs import DecimalPair, make_pair, sample_pairs

COMPONENTS: tuple[str, ...] = ("attention_output", "mlp_output", "block_output")

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


def setting(pipeline, pair: DecimalPair, fmt: str) -> dict[str, Any]:
    """The setting of ``pair`` in format ``fmt`` (the pipeline's tokenizer renders a chat format)."""
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
    """A ``fix`` (``fix.<format>``) cell succeeds when the answer becomes correct; a ``break`` cell when it becomes
    buggy."""
    return "correct" if dataset_id.split(".", 1)[0] == "fix" else "buggy"


def run_cells(pipeline, cells, datasets: dict[str, Any], folder: Path, exp_id: str, batch_size: int = 64,
              max_rows: int = 2048, restart: bool = False) -> list[dict]:
    """Run ``cells`` on ``datasets`` through the engine (resumable in ``folder``; ``restart`` discards what it
    holds first); `success_rows` of the results."""
    from experiments.engine.intervention_experiment import InterventionExperiment

    experiment = InterventionExperiment(pipeline, cells, {"id": exp_id, "batch_size": batch_size,
                                                          "max_rows_per_forward": max_rows})
    raw = experiment.perform_interventions(datasets, results_dir=folder, verbose=True, restart=restart)
    return success_rows({"": raw}, datasets, exp_id)


def success_rows(raws: dict[str, Any], datasets: dict[str, Any], name: str, format: str | None = None) -> list[dict]:
    """The decimal study's metric, from raw results (no model): one row per (dataset, cell) with the success rate
    (``fix`` datasets: the answer becomes correct; ``break``: it becomes buggy, read by `classify_answer`), its CI,
    the floor (the unpatched base run) and the paired verdict, Holm-corrected across every cell of ``raws`` on the
    dataset. ``raws``: prefix -> RawResults (cell ids become ``<prefix>.<cell>``, e.g. one sweep per component);
    ``format``: the buggy format of datasets named ``fix`` / ``break`` (``fix.<format>`` names its own)."""
    rows = []
    pairs: list[pd.DataFrame] = []  # per pair: patched / unpatched reached the target outcome (for the verdicts)
    for prefix, raw in raws.items():
        addresses = raw.cell_addresses().set_index("cell_id")
        for did, dataset in datasets.items():
            direction, _, fmt = did.partition(".")
            xy = {i: (ex["input"]["x"], ex["input"]["y"]) for i, ex in enumerate(dataset)}
            want = target_outcome(did)
            base = raw.base_outputs(did)
            base_hit = {int(i): outcome_of(t, *xy[i]) == want for t, i in zip(base["output_text"], base["example_index"])}
            floor_k = sum(base_hit.values())
            for cell_id, frame in raw.intervened_outputs(did).groupby("cell_id", sort=False):
                outcomes = [outcome_of(t, *xy[i]) for t, i in zip(frame["output_text"], frame["example_index"])]
                named = f"{prefix}.{cell_id}" if prefix else cell_id
                pairs.append(pd.DataFrame({"target_variables": direction, "dataset_id": did, "cell_id": named,
                                           "correct": [o == want for o in outcomes],
                                           "base_correct_on_label": [base_hit[int(i)] for i in frame["example_index"]]}))
                addr = addresses.loc[cell_id]
                rows.append({
                    "dataset_id": did, "direction": direction, "format": fmt or format,
                    "cell_id": named, "layer": int(addr["layer"]), "component": addr["component"],
                    "head": None if addr["head"] is None or str(addr["head"]) == "<NA>" else int(addr["head"]),
                    "position_id": addr["position_id"], "n_units": int(addr["n_units"]),
                    "success": rate(outcomes.count(want), len(outcomes)),
                    "floor": rate(floor_k, len(base)),
                    "outcomes": {o: outcomes.count(o) for o in OUTCOMES},
                })
    if pairs:  # the paired verdict of each (dataset, cell), corrected across the cells of its dataset
        tests = verdicts_from_per_example(name, pd.concat(pairs, ignore_index=True)).tests.set_index(["scope", "cell_id"])
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
    from experiments.engine.intervention_engine import Cell
    from experiments.engine.model_units import ModelUnit
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

    from experiments.backends.attention_control import RecordAttention
    from experiments.backends import backend_with
    from tasks.decimal_comparison.token_positions import adds_bos, role_indices

    layers = list(range(pipeline.num_layers))
    bos = adds_bos(pipeline)
    stats: dict[str, dict[str, np.ndarray]] = {}
    for fmt in formats:
        settings = [setting(pipeline, p, fmt) for p in pairs]
        batch = pipeline.load(settings)
        width = batch.input_ids.shape[1]
        with torch.no_grad(), backend_with("attention", pipeline.model).attention(
                [RecordAttention(layers, query_positions=[width - 1], coordinates="cache")]) as ctl:
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
        with torch.no_grad(), backend_with("attention", pipeline.model).attention([RecordAttention(layers)]) as ctl:
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
    from experiments.engine.intervention_engine import Cell
    from experiments.engine.model_units import AttentionPattern
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
    from experiments.engine.intervention_engine import Cell
    from experiments.engine.model_units import AttentionPattern
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
    from experiments.engine.intervention_engine import Cell
    from experiments.engine.model_units import AttentionHead, AttentionPattern
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

    from experiments.engine.intervention_engine import InterventionEngine
    from experiments.backends.sites import Site

    engine = InterventionEngine(pipeline)
    batch = pipeline.load(prompts)
    sites = [Site(l, "head_attention_value_output") for l in layers]
    with torch.no_grad():
        acts = engine.backend.collect(sites, batch.model_inputs())
    mask = batch.attention_mask.bool()
    return {site.layer: acts[site][mask].float().mean(0) for site in sites}  # (H, d)


def ablation_cells(pipeline, layers: Sequence[int], means: dict[int, Any]):
    from experiments.engine.intervention_engine import Cell
    from experiments.engine.model_units import AttentionHead
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




def critical_layers(rows: list[dict], layers: Sequence[int], component: str) -> list[int]:
    """Layers ranked by the fix rate of patching ``component`` at the matched positions."""
    if not rows:
        return list(layers)
    score = {l: np.mean([r["success"]["rate"] for r in rows if r["layer"] == l and r["component"] == component
                         and r["position_id"] == "matched" and r["direction"] == "fix"] or [0.0]) for l in layers}
    return sorted(layers, key=lambda l: (-score[l], l))

