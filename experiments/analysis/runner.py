"""Run the analyses named in an :class:`AnalyzeConfig` on one model and task, into one report folder.

Sections (folders): ``attention/`` (profiles, per-example maps, EXP0), ``logit_lens/``, ``probing/``,
``interventions/`` (ablations, activation patching), ``circuits/``, ``gain/`` (EXP1–EXP3).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from experiments.analysis.ablation import cumulative_ablation, importance, target_name
from experiments.analysis.attention import attention_matrices, per_head_summary, profile_attention
from experiments.analysis.circuits import rank_heads, rank_neurons, role_attention
from experiments.analysis.config import ANALYSES, AnalyzeConfig
from experiments.analysis.lens import first_decodable_layer, lens_summary, logit_lens
from experiments.analysis.observational import per_layer_stats, query_norm_entropy_correlations
from experiments.analysis.patching import activation_patching, recovery_grid
from experiments.analysis.probes import probe_variables
from experiments.analysis.report import Report, heatmap
from experiments.analysis.scaling import gain_of, gain_table, query_vs_key, scaling_sweep
from experiments.analysis.task_spec import TaskAnalysis, load_task_analysis
from experiments.pipeline import LMPipeline


@dataclass
class Context:
    cfg: AnalyzeConfig
    task: TaskAnalysis
    pipeline: LMPipeline
    report: Report
    examples: list[dict[str, Any]]
    settings: list[dict[str, Any]]
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def heads(self) -> list[str]:
        return [f"L{l}H{h}" for l in range(self.pipeline.num_layers) for h in range(self.pipeline.num_heads)]


def _grid(frame: pd.DataFrame, value: str, layers: int, heads: int) -> np.ndarray:
    grid = np.full((layers, heads), np.nan)
    for _, r in frame.iterrows():
        grid[int(r["layer"]), int(r["head"])] = r[value]
    return grid


def _head_heatmap(ctx: Context, frame: pd.DataFrame, value: str, title: str, cbar: str, **kw: Any) -> plt.Figure:
    p = ctx.pipeline
    return heatmap(_grid(frame, value, p.num_layers, p.num_heads), [f"H{h}" for h in range(p.num_heads)],
                   [f"L{l}" for l in range(p.num_layers)], title, cbar, **kw)


# ---------------------------------------------------------------------------- sections
def run_attention(ctx: Context) -> None:
    cfg, p, rep = ctx.cfg, ctx.pipeline, ctx.report
    table = profile_attention(p, ctx.settings, sink_tokens=cfg.sink_tokens, mass=cfg.mass,
                              batch_size=cfg.batch_size, progress=cfg.progress)
    rep.table("attention/profile", table)
    summary = per_head_summary(table)
    rep.table("attention/per_head", summary, parquet=False)
    read = table[table["position"] == table.groupby("example")["position"].transform("max")]
    read_summary = per_head_summary(read)
    rep.table("attention/per_head_read_position", read_summary, parquet=False)
    sharp = read_summary.sort_values("entropy").iloc[0]
    rep.figure("attention", "attention/entropy_read_position.png",
               _head_heatmap(ctx, read_summary, "entropy", "Entropy at the last prompt token (nats)", "entropy",
                             cmap="magma_r"),
               "Attention entropy per head at the read position",
               f"Sharpest head at the read position: L{int(sharp.layer)}H{int(sharp['head'])} "
               f"(entropy {sharp.entropy:.2f} nats, max attention {sharp.max_attention:.2f}, k_eff {sharp.k_eff:.1f}).")
    rep.figure("attention", "attention/k_eff_all_positions.png",
               _head_heatmap(ctx, summary, "k_eff", f"k_eff ({cfg.mass:.0%} mass), mean over positions", "keys"),
               "k_eff per head, all query positions",
               f"Mean k_eff over heads and positions {summary.k_eff.mean():.2f} keys; "
               f"widest head L{int(summary.loc[summary.k_eff.idxmax(), 'layer'])}"
               f"H{int(summary.loc[summary.k_eff.idxmax(), 'head'])} ({summary.k_eff.max():.2f}).")
    ctx.results["attention_read"] = read_summary
    rep.summary["attention"] = {"sharpest_read_head": f"L{int(sharp.layer)}H{int(sharp['head'])}",
                                "sharpest_read_entropy": float(sharp.entropy), "sink_tokens": cfg.sink_tokens,
                                "n_prompts": len(ctx.settings)}
    for i, ex in enumerate(ctx.examples):
        per_example = []
        for layer in range(p.num_layers):
            probs, tokens = attention_matrices(p, ex, layer)
            H = probs.shape[0]
            fig, axes = plt.subplots(1, H, figsize=(2.6 * H, 2.8))
            for h, ax in enumerate(np.atleast_1d(axes)):
                ax.imshow(probs[h], cmap="Blues", vmin=0, vmax=1)
                ax.set_title(f"L{layer}H{h}", fontsize=9)
                ax.set_xticks(range(len(tokens)), tokens, fontsize=7)
                ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
            fig.suptitle(f"{ex['raw_input']} — layer {layer} (rows: queries, columns: keys)")
            fig.tight_layout()
            last = probs[:, -1, :]
            top = [f"H{h}→{tokens[int(last[h].argmax())]} ({last[h].max():.2f})" for h in range(H)]
            rep.figure("attention", f"attention/example{i}_layer{layer}.png", fig,
                       f"{ex['raw_input']}: all heads of layer {layer}",
                       f"From the last token: {', '.join(top)}.")
            per_example.append({"layer": layer, "tokens": tokens, "last_row": last.round(4).tolist()})
        rep.json(f"attention/example{i}.json", {"prompt": ex["raw_input"], "layers": per_example})


def run_observational(ctx: Context) -> None:
    cfg, p, rep = ctx.cfg, ctx.pipeline, ctx.report
    table = profile_attention(p, ctx.settings, query_positions=[-1], sink_tokens=cfg.sink_tokens, mass=cfg.mass,
                              batch_size=cfg.batch_size, progress=cfg.progress)
    corr = query_norm_entropy_correlations(table, alpha=cfg.alpha, seed=cfg.seed)
    layers = per_layer_stats(corr)
    rep.table("attention/exp0_correlations", corr, parquet=False)
    rep.table("attention/exp0_per_layer", layers, parquet=False)
    sig = corr[corr["significant"]]
    cons = corr[corr["consistent"]]
    strongest = corr.iloc[corr["pearson_r"].abs().idxmax()]
    rep.figure("attention", "attention/exp0_query_norm_vs_entropy.png",
               _head_heatmap(ctx, corr, "pearson_r", "Pearson r(query norm, entropy) across prompts", "r",
                             cmap="coolwarm", vmin=-1, vmax=1),
               "EXP0: query norm vs attention entropy at the read position",
               f"{len(sig)}/{len(corr)} heads significant (BH q<{cfg.alpha}, Pearson and Spearman), {len(cons)} "
               f"consistent across halves; strongest L{int(strongest.layer)}H{int(strongest['head'])} "
               f"r={strongest.pearson_r:.2f}.")
    g = table[(table["layer"] == strongest.layer) & (table["head"] == strongest["head"])]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.scatter(g["query_norm"], g["entropy"], s=8, alpha=0.6)
    ax.set_xlabel("query norm (after rotary)")
    ax.set_ylabel("entropy (nats)")
    ax.set_title(f"L{int(strongest.layer)}H{int(strongest['head'])}, one point per prompt")
    rep.figure("attention", "attention/exp0_scatter_strongest.png", fig, "EXP0: the strongest head's prompts",
               f"Pearson r={strongest.pearson_r:.2f} (q={strongest.pearson_q:.2g}), Spearman "
               f"r={strongest.spearman_r:.2f} (q={strongest.spearman_q:.2g}), n={int(strongest.n)} prompts.")
    rep.summary["exp0"] = {"significant": [f"L{int(r.layer)}H{int(r.head)}" for r in sig.itertuples()],
                           "consistent": [f"L{int(r.layer)}H{int(r.head)}" for r in cons.itertuples()],
                           "strongest": f"L{int(strongest.layer)}H{int(strongest['head'])}",
                           "strongest_pearson_r": float(strongest.pearson_r)}


def run_lens(ctx: Context) -> None:
    cfg, p, rep, task = ctx.cfg, ctx.pipeline, ctx.report, ctx.task
    answers = [task.answer(s) for s in ctx.settings]
    lens = logit_lens(p, ctx.settings, answers, batch_size=cfg.batch_size, progress=cfg.progress)
    rep.table("logit_lens/lens", lens)
    summary = lens_summary(lens)
    rep.table("logit_lens/summary", summary, parquet=False)
    first = first_decodable_layer(lens)
    rep.table("logit_lens/first_layer", first, parquet=False)
    steps = sorted(lens["step"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for step in steps:
        s = summary[summary["step"] == step]
        axes[0].plot(s["layer"], s["top1_accuracy"], marker="o", label=f"answer token {step}")
        axes[1].plot(s["layer"], s["entropy"], marker="o", label=f"answer token {step}")
    axes[0].set(xlabel="layer (-1 = embeddings)", ylabel="lens top-1 = answer token", title="Decodability")
    axes[1].set(xlabel="layer (-1 = embeddings)", ylabel="entropy (nats)", title="Lens entropy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    per_step = {}
    for step in steps:
        s = summary[summary["step"] == step].sort_values("layer")
        ok = s[s["top1_accuracy"] >= 0.5]
        per_step[int(step)] = {"first_layer_majority_top1": int(ok["layer"].iloc[0]) if len(ok) else None,
                               "median_first_layer": float(first[first["step"] == step]["first_layer"].median()),
                               "final_top1_accuracy": float(s["top1_accuracy"].iloc[-1]),
                               "n": int(s["n"].iloc[-1])}
    reading = "; ".join(f"token {k}: top-1 for most prompts from layer {v['first_layer_majority_top1']}"
                        for k, v in per_step.items())
    rep.figure("logit_lens", "logit_lens/decodability.png", fig, "Logit lens: answer decodability and entropy per layer",
               reading + ".")
    rep.summary["logit_lens"] = per_step
    for i, ex in enumerate(ctx.examples):
        one = logit_lens(p, [ex], [task.answer(ex)], progress=False)
        piv = one.pivot_table(index="layer", columns="step", values="target_prob")
        tops = one.pivot_table(index="layer", columns="step", values="top1_token", aggfunc="first")
        fig = heatmap(piv.to_numpy(), [f"→{t}" for t in one.groupby("step")["target_token"].first()],
                      [str(l) for l in piv.index], f"{ex['raw_input']}: p(answer token) per layer", "probability",
                      vmin=0, vmax=1)
        rep.table(f"logit_lens/example{i}", one, parquet=False)
        rep.figure("logit_lens", f"logit_lens/example{i}.png", fig, f"Logit lens on {ex['raw_input']}",
                   "Top-1 per layer (rows) and answer token (columns): "
                   + " | ".join(f"L{l}: {' '.join(map(str, tops.loc[l].tolist()))}" for l in tops.index) + ".")


def run_probing(ctx: Context) -> None:
    cfg, p, rep, task = ctx.cfg, ctx.pipeline, ctx.report, ctx.task
    variables = cfg.probe_variables or list(task.probe_variables)
    table = probe_variables(p, ctx.settings, variables, task.labels, task.positions, batch_size=cfg.batch_size,
                            seed=cfg.seed, progress=cfg.progress)
    rep.table("probing/probes", table, parquet=False)
    order = list(task.positions(p, ctx.settings[0]))
    out = {}
    for var in variables:
        t = table[table["variable"] == var]
        acc = t.pivot_table(index="layer", columns="position", values="accuracy")[order]
        gap = (t.assign(gap=t["accuracy"] - t["control_accuracy"])
               .pivot_table(index="layer", columns="position", values="gap")[order])
        best = t.loc[t["accuracy"].idxmax()]
        above = t[t["above_control"]]
        first = above.sort_values("layer").iloc[0] if len(above) else None
        fig = heatmap(acc.to_numpy(), order, [str(l) for l in acc.index], f"Probe accuracy for {var} (held out)",
                      "accuracy", vmin=0, vmax=1)
        rep.figure("probing", f"probing/{var}.png", fig, f"Linear probe: {var}",
                   f"Best {best.accuracy:.2f} [{best.ci_low:.2f}, {best.ci_high:.2f}] at layer {int(best.layer)}, "
                   f"{best.position} (shuffled control {best.control_accuracy:.2f}); "
                   + (f"first above control at layer {int(first.layer)}, {first.position}." if first is not None
                      else "never above the control."))
        fig = heatmap(gap.to_numpy(), order, [str(l) for l in gap.index], f"{var}: probe minus shuffled control",
                      "accuracy gap", cmap="coolwarm", vmin=-1, vmax=1)
        rep.figure("probing", f"probing/{var}_gap.png", fig, f"Linear probe: {var}, gap to the control",
                   f"{len(above)}/{len(t)} (layer, position) cells have a 95% CI above the control accuracy.")
        out[var] = {"best_layer": int(best.layer), "best_position": best.position, "best_accuracy": float(best.accuracy),
                    "best_ci": [float(best.ci_low), float(best.ci_high)], "control": float(best.control_accuracy),
                    "cells_above_control": [f"L{int(r.layer)}:{r.position}" for r in above.itertuples()],
                    "n_test": int(best.n_test)}
    rep.summary["probing"] = out


def run_interventions(ctx: Context) -> None:
    cfg, p, rep, task = ctx.cfg, ctx.pipeline, ctx.report, ctx.task
    settings = ctx.settings[: cfg.n_ablation]
    layer_targets = [(c, l) for l in range(p.num_layers) for c in ("attention", "mlp")]
    frames = []
    for kind in cfg.ablation_kinds:
        frames.append(importance(p, settings, layer_targets, task.answer, task.check, task.max_new_tokens, kind,
                                 reference=ctx.settings, batch_size=cfg.batch_size, progress=cfg.progress))
    layers = pd.concat(frames, ignore_index=True)
    rep.table("interventions/layer_importance", layers, parquet=False)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind in cfg.ablation_kinds:
        for comp, style in (("attention", "-o"), ("mlp", "--s")):
            s = layers[(layers["kind"] == kind) & (layers["component"] == comp)]
            axes[0].plot(s["layer"], s["accuracy"], style, label=f"{kind} {comp}")
            axes[1].plot(s["layer"], s["logprob_drop"], style, label=f"{kind} {comp}")
    axes[0].axhline(layers["clean_accuracy"].iloc[0], color="k", lw=0.8, ls=":")
    axes[0].set(xlabel="layer", ylabel="task accuracy", title="Accuracy with the component ablated")
    axes[1].set(xlabel="layer", ylabel="drop in answer log-prob", title="Answer log-prob drop")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    worst = layers.loc[layers["logprob_drop"].idxmax()]
    rep.figure("interventions", "interventions/layer_importance.png", fig, "Layer importance by ablation",
               f"Clean accuracy {layers['clean_accuracy'].iloc[0]:.2f} on {len(settings)} prompts; the largest "
               f"effect is {worst.kind}-ablating {worst.target} (accuracy {worst.accuracy:.2f}, log-prob drop "
               f"{worst.logprob_drop:.1f} nats).")
    summary: dict[str, Any] = {"clean_accuracy": float(layers["clean_accuracy"].iloc[0]), "n": len(settings),
                               "layers": {f"{r.kind} {r.target}": {"accuracy": r.accuracy,
                                                                   "logprob_drop": r.logprob_drop}
                                          for r in layers.itertuples()}}
    if cfg.head_ablation:
        heads = [("head", l, h) for l in range(p.num_layers) for h in range(p.num_heads)]
        kind = "mean" if "mean" in cfg.ablation_kinds else cfg.ablation_kinds[0]
        ht = importance(p, settings, heads, task.answer, task.check, task.max_new_tokens, kind,
                        reference=ctx.settings, batch_size=cfg.batch_size, progress=cfg.progress)
        rep.table("interventions/head_importance", ht, parquet=False)
        ranked = ht.sort_values("logprob_drop", ascending=False)
        top = ranked.iloc[0]
        rep.figure("interventions", "interventions/head_importance.png",
                   _head_heatmap(ctx, ht, "accuracy_drop", f"Accuracy drop, {kind}-ablating one head", "drop",
                                 cmap="Reds", vmin=0, vmax=1),
                   f"Head importance ({kind} ablation)",
                   f"Most important head {top.target}: accuracy {top.accuracy:.2f} (drop {top.accuracy_drop:.2f}), "
                   f"log-prob drop {top.logprob_drop:.1f}; heads with accuracy drop > 0.1: "
                   f"{', '.join(ranked[ranked.accuracy_drop > 0.1].target) or 'none'}.")
        order = [("head", int(r.layer), int(r.head)) for r in ranked.itertuples()]
        cum = cumulative_ablation(p, settings, order, task.answer, task.check, task.max_new_tokens, kind,
                                  reference=ctx.settings, batch_size=cfg.batch_size, progress=cfg.progress)
        rep.table("interventions/cumulative_heads", cum, parquet=False)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(cum["k"], cum["accuracy"], marker="o")
        ax.set(xlabel="heads ablated (most important first)", ylabel="task accuracy",
               title=f"Cumulative {kind} ablation of heads")
        half = cum[cum["accuracy"] < cum["accuracy"].iloc[0] / 2]
        rep.figure("interventions", "interventions/cumulative_heads.png", fig, "Cumulative head ablation",
                   f"Accuracy falls below half of clean after {int(half['k'].iloc[0]) if len(half) else 'more than all'}"
                   f" heads (order: {', '.join(cum['last_added'].iloc[1:6])}, …).")
        summary["heads"] = {r.target: {"accuracy_drop": r.accuracy_drop, "logprob_drop": r.logprob_drop}
                            for r in ranked.itertuples()}
        summary["head_kind"] = kind
    rep.summary["interventions"] = summary


def run_patching(ctx: Context) -> None:
    cfg, p, rep, task = ctx.cfg, ctx.pipeline, ctx.report, ctx.task
    rng = random.Random(cfg.seed)
    clean = ctx.examples + ctx.settings[: cfg.n_patch_pairs]
    corrupted = [task.corrupt(s, rng) for s in clean]
    table = activation_patching(p, clean, corrupted, progress=cfg.progress)
    if table.empty:
        rep.note("interventions", "Activation patching: no pair changed the first answer token; nothing to show.")
        return
    rep.table("interventions/patching", table, parquet=False)
    grid = recovery_grid(table)
    names = list(task.positions(p, clean[0]).items())
    labels = [next((n for n, i in names if i == c), str(c)) for c in grid.columns]
    fig = heatmap(grid.to_numpy(), labels, [str(l) for l in grid.index],
                  "Recovery of the clean first answer token (patching the clean residual)", "recovery",
                  cmap="RdBu", vmin=-1, vmax=1)
    last = grid.columns[-1]
    per_layer = grid[last]
    rest = grid.drop(columns=[last]).stack()
    best_layer, best_col = rest.idxmax()
    best_name = labels[list(grid.columns).index(best_col)]
    full = per_layer[per_layer >= 0.9]
    rep.figure("interventions", "interventions/patching_grid.png", fig, "Activation patching, layer × position",
               f"{table['pair'].nunique()} pairs; at the last position recovery reaches 0.9 from layer "
               f"{int(full.index[0]) if len(full) else 'none'}; best non-last cell "
               f"layer {int(best_layer)} at {best_name} ({rest.max():.2f}).")
    rep.summary["patching"] = {"pairs": int(table["pair"].nunique()),
                               "recovery_at_last_position": {int(k): float(v) for k, v in per_layer.items()},
                               "grid": {str(l): {labels[j]: float(grid.iloc[i, j]) for j in range(grid.shape[1])}
                                        for i, l in enumerate(grid.index)}}


def run_circuits(ctx: Context) -> None:
    cfg, p, rep, task = ctx.cfg, ctx.pipeline, ctx.report, ctx.task
    answers = [task.answer(s) for s in ctx.settings]
    table = role_attention(p, ctx.settings, task.roles, answers, batch_size=cfg.batch_size, progress=cfg.progress)
    rep.table("circuits/role_attention", table)
    roles = list(dict.fromkeys(table["role"]))
    out: dict[str, Any] = {}
    for role in roles:
        ranked = rank_heads(table, role, step=0)
        rep.table(f"circuits/heads_{role}", ranked, parquet=False)
        top = ranked.iloc[0]
        rep.figure("circuits", f"circuits/heads_{role}.png",
                   _head_heatmap(ctx, ranked, "mass", f"Attention from the last prompt token to '{role}'", "mass",
                                 vmin=0, vmax=1),
                   f"Heads attending to {role} from the answer position",
                   f"Top: {', '.join(f'L{int(r.layer)}H{int(r.head)} {r.mass:.2f} (×{r.lift:.1f} uniform)' for r in ranked.head(3).itertuples())}; "
                   f"{int(top.n)} prompts with this role.")
        out[role] = [{"head": f"L{int(r.layer)}H{int(r.head)}", "mass": r.mass, "lift": r.lift}
                     for r in ranked.head(5).itertuples()]
    ctx.results["carry_ranking"] = rank_heads(table, "carry_digits", 0) if "carry_digits" in roles else None
    labels = task.labels(ctx.settings, task.class_variable)
    neurons = rank_neurons(p, ctx.settings, labels, top=20, batch_size=cfg.batch_size)
    rep.table("circuits/neurons", neurons, parquet=False)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([f"L{r.layer}N{r.neuron}" for r in neurons.itertuples()], neurons["score"])
    ax.set_ylabel(neurons["metric"].iloc[0])
    ax.set_title(f"MLP neurons separating {task.class_variable} at the last prompt token")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    rep.figure("circuits", "circuits/neurons.png", fig, f"Neurons separating {task.class_variable}",
               f"Top neuron L{neurons.layer.iloc[0]}N{neurons.neuron.iloc[0]} "
               f"({neurons.metric.iloc[0]} {neurons.score.iloc[0]:.2f}); layers among the top 20: "
               f"{ {int(k): int(v) for k, v in neurons.layer.value_counts().sort_index().items()} }.")
    out["neurons"] = [{"neuron": f"L{r.layer}N{r.neuron}", "score": r.score} for r in neurons.head(5).itertuples()]
    rep.summary["circuits"] = out


def run_gain(ctx: Context) -> None:
    cfg, p, rep, task = ctx.cfg, ctx.pipeline, ctx.report, ctx.task
    prompts = ctx.settings[: cfg.n_gain]
    ranking = ctx.results.get("carry_ranking")
    if cfg.gain_target is not None:
        layer, head = cfg.gain_target
    elif ranking is not None:
        layer, head = int(ranking.layer.iloc[0]), int(ranking["head"].iloc[0])
    else:
        layer, head = p.num_layers - 1, 0
    controls = cfg.gain_controls
    if controls is None:
        controls = [(layer + 1, head)] if layer + 1 < p.num_layers else []  # a same-layer head cannot move
    sweep = scaling_sweep(p, prompts, layer, head, cfg.factors, "query", "read", controls=controls,
                          batch_size=cfg.batch_size)
    rep.table("gain/exp1_sweep", sweep, parquet=False)
    means = sweep.groupby(["role", "m_layer", "m_head", "factor"], as_index=False)[
        ["entropy", "max_attention", "k_eff"]].mean()
    rep.table("gain/exp1_means", means, parquet=False)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for (role, ml, mh), g in means.groupby(["role", "m_layer", "m_head"]):
        for ax, col in zip(axes, ("entropy", "max_attention", "k_eff")):
            ax.plot(g["factor"], g[col], marker="o", label=f"{role} L{ml}H{mh}")
            ax.set(xscale="log", xlabel="query scale s", ylabel=col)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"EXP1: scaling L{layer}H{head}'s query at the read position only")
    fig.tight_layout()
    g1 = gain_of(sweep)
    tgt = means[means.role == "target"]
    rep.figure("gain", "gain/exp1.png", fig, f"EXP1: query scaling of L{layer}H{head}",
               f"{sweep['scaled'].iloc[0]}; target max attention {tgt.max_attention.iloc[0]:.2f}→"
               f"{tgt.max_attention.iloc[-1]:.2f} and entropy {tgt.entropy.iloc[0]:.2f}→{tgt.entropy.iloc[-1]:.2f} "
               f"from s={cfg.factors[0]} to {cfg.factors[-1]}; gain {g1['gain']:.3f}±{g1['gain_se']:.3f} "
               f"(R² {g1['gain_r2']:.2f}); controls {', '.join(f'L{a}H{b}' for a, b in controls)}.")
    gains = gain_table(p, prompts, cfg.factors, batch_size=cfg.batch_size, progress=cfg.progress)
    rep.table("gain/exp2_gain", gains, parquet=False)
    hi, lo = gains.loc[gains.gain.idxmax()], gains.loc[gains.gain.idxmin()]
    rep.figure("gain", "gain/exp2.png",
               _head_heatmap(ctx, gains, "gain", "EXP2: d(mean max attention)/d ln s, queries at the read position",
                             "gain", cmap="coolwarm", vmin=-abs(gains.gain).max(), vmax=abs(gains.gain).max()),
               "EXP2: gain of every head",
               f"Most sensitive L{int(hi.layer)}H{int(hi['head'])} gain {hi.gain:.3f}±{hi.gain_se:.3f} "
               f"(R² {hi.gain_r2:.2f}); least L{int(lo.layer)}H{int(lo['head'])} {lo.gain:.3f}±{lo.gain_se:.3f} "
               f"(R² {lo.gain_r2:.2f}).")
    key_positions = [task.roles(p, s)[cfg.key_role] for s in prompts]
    qk, qk_summary = query_vs_key(p, prompts, layer, head, cfg.factors, key_positions=key_positions,
                                  batch_size=cfg.batch_size)
    qk_summary["key_role"] = cfg.key_role
    rep.table("gain/exp3_sweep", qk, parquet=False)
    rep.json("gain/exp3_summary.json", qk_summary)
    m = qk.groupby(["target", "factor"], as_index=False)["max_attention"].mean()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for target, g in m.groupby("target"):
        ax.plot(g["factor"], g["max_attention"], marker="o",
                label=qk_summary["query_scaled"] if target == "query" else f"keys at '{cfg.key_role}' tokens")
    ax.set(xscale="log", xlabel="scale s", ylabel="mean max attention (read position)",
           title=f"EXP3: query vs key scaling, L{layer}H{head}")
    ax.legend(fontsize=7)
    rep.figure("gain", "gain/exp3.png", fig, f"EXP3: query vs key scaling of L{layer}H{head}",
               f"Gain through the read-position query {qk_summary['gain_query']:.3f}, through the keys at "
               f"'{cfg.key_role}' tokens {qk_summary['gain_key']:.3f}; sensitivity ratio "
               f"{qk_summary['sensitivity_ratio']:.2f}.")
    rep.summary["gain"] = {"exp1_target": f"L{layer}H{head}", "exp1": g1,
                           "most_sensitive": {"head": f"L{int(hi.layer)}H{int(hi['head'])}", "gain": hi.gain,
                                              "se": hi.gain_se, "r2": hi.gain_r2},
                           "least_sensitive": {"head": f"L{int(lo.layer)}H{int(lo['head'])}", "gain": lo.gain,
                                               "se": lo.gain_se, "r2": lo.gain_r2},
                           "exp3": qk_summary}


RUNNERS = {"attention": run_attention, "observational": run_observational, "lens": run_lens,
           "probing": run_probing, "circuits": run_circuits, "interventions": run_interventions,
           "patching": run_patching, "gain": run_gain}


def run_analysis(cfg: AnalyzeConfig, pipeline: LMPipeline | None = None) -> Report:
    """Run ``cfg.analyses`` (every analysis when empty) and write the report to ``cfg.out``."""
    if cfg.out is None:
        raise ValueError("set out (the report folder)")
    task = load_task_analysis(cfg.task)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if pipeline is None:
        model = cfg.model
        if model == "organism":
            if task.organism is None:
                raise ValueError(f"task {cfg.task!r} ships no organism; pass --model")
            model = str(task.organism)
        pipeline = LMPipeline(model, max_new_tokens=task.max_new_tokens, device=cfg.device, dtype=cfg.dtype)
    torch.manual_seed(cfg.seed)
    examples = [task.parse_example(e) for e in cfg.examples]
    settings = task.sample(cfg.n_examples, cfg.seed)
    report = Report(Path(cfg.out), title=f"{cfg.task} on {pipeline.name}")
    ctx = Context(cfg, task, pipeline, report, examples, settings)
    report.summary["config"] = cfg.model_dump(mode="json")
    report.summary["model"] = {"name": pipeline.name, "layers": pipeline.num_layers, "heads": pipeline.num_heads,
                               "kv_heads": pipeline.num_kv_heads}
    wanted = cfg.analyses or list(ANALYSES)
    order = [a for a in RUNNERS if a in wanted]  # circuits before gain: gain's default target comes from it
    for name in order:
        RUNNERS[name](ctx)
        report.finish()  # the index is usable after every section
    return report
