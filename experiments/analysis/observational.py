"""EXP0, observational: does a head attend more sharply on prompts where its query is larger?

Per head, across prompts, correlate the query norm (after rotary) with the attention entropy at one
read position (default: the last prompt token). Pearson and Spearman with two-sided p-values, BH
q-values over all heads. ``significant``: both q < alpha. ``consistent``: significant, Pearson and
Spearman agree in sign, and the Pearson r has that sign in both random halves of the prompts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from experiments.analysis.stats import benjamini_hochberg, correlation


def query_norm_entropy_correlations(table: pd.DataFrame, position: int | None = None, alpha: float = 0.05,
                                    seed: int = 0, x: str = "query_norm", y: str = "entropy") -> pd.DataFrame:
    """One row per (layer, head) from a profiler table (:func:`profile_attention`).

    ``position``: unpadded query index to use (None: each example's last profiled position).
    """
    if position is None:
        last = table.groupby("example")["position"].transform("max")
        rows = table[table["position"] == last]
    else:
        rows = table[table["position"] == position]
    if rows.empty:
        raise ValueError(f"no profiled rows at query position {position}")
    rng = np.random.default_rng(seed)
    examples = rows["example"].unique()
    half = set(rng.permutation(examples)[: len(examples) // 2].tolist())
    out = []
    for (layer, head), g in rows.groupby(["layer", "head"]):
        r = correlation(g[x].to_numpy(), g[y].to_numpy())
        in_half = g["example"].isin(half).to_numpy()
        r1 = correlation(g[x].to_numpy()[in_half], g[y].to_numpy()[in_half])["pearson_r"]
        r2 = correlation(g[x].to_numpy()[~in_half], g[y].to_numpy()[~in_half])["pearson_r"]
        out.append({"layer": int(layer), "head": int(head), **r, "pearson_r_half1": r1, "pearson_r_half2": r2,
                    f"mean_{x}": float(g[x].mean()), f"mean_{y}": float(g[y].mean())})
    frame = pd.DataFrame(out)
    frame["pearson_q"] = benjamini_hochberg(frame["pearson_p"].to_numpy())
    frame["spearman_q"] = benjamini_hochberg(frame["spearman_p"].to_numpy())
    frame["significant"] = (frame["pearson_q"] < alpha) & (frame["spearman_q"] < alpha)
    sign = np.sign(frame["pearson_r"])
    frame["consistent"] = (frame["significant"] & (sign == np.sign(frame["spearman_r"]))
                           & (np.sign(frame["pearson_r_half1"]) == sign) & (np.sign(frame["pearson_r_half2"]) == sign))
    return frame


def per_layer_stats(corr: pd.DataFrame) -> pd.DataFrame:
    """Per layer: heads, mean/min/max Pearson r, number significant and consistent."""
    return corr.groupby("layer").agg(
        heads=("head", "count"), mean_pearson_r=("pearson_r", "mean"), min_pearson_r=("pearson_r", "min"),
        max_pearson_r=("pearson_r", "max"), mean_spearman_r=("spearman_r", "mean"),
        significant=("significant", "sum"), consistent=("consistent", "sum"),
    ).reset_index()
