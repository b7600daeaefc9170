"""Q/K scaling experiments (EXP1–EXP3): how sharply a head's attention responds to its query or key gain.

Scaling one head's queries at ALL positions by s and scaling the keys it sees at ALL positions by s
give identical logits (both multiply q·k by s). So the query arm scales queries at the *read
position only* (default: the last prompt token) and the key arm scales keys at *chosen key
positions* (default: every real key; a task can pass e.g. its digit tokens). Every result row says
which (``scaled`` column). Measurements are the recorded post-rotary probabilities at the read
position: entropy, max attention, k_eff (90%), for the target head and control heads.

``gain`` = slope of mean max attention against ln s over the factor grid, with SE and R².
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments.analysis.attention import row_statistics
from experiments.analysis.model_access import batches, check_head, check_layer
from experiments.analysis.stats import ols_slope
from experiments.backends.attention_control import RecordAttention, ScaleQK
from experiments.backends import backend_with
from experiments.pipeline import LMPipeline

Head = tuple[int, int]
Where = Literal["read", "all"]


def default_factors(n: int = 9, low: float = 0.25, high: float = 4.0) -> list[float]:
    """``n`` log-spaced factors from ``low`` to ``high`` (1.0 included when n is odd and the grid is symmetric)."""
    return [float(f) for f in np.geomspace(low, high, n)]


def _read_index(length: int, read_position: int) -> int:
    j = read_position + length if read_position < 0 else read_position
    if not 0 <= j < length:
        raise ValueError(f"read position {read_position} outside a prompt of {length} tokens")
    return j


@torch.no_grad()
def scaling_sweep(
    pipeline: LMPipeline,
    prompts: Sequence[Any],
    layer: int,
    head: int,
    factors: Sequence[float] | None = None,
    target: Literal["query", "key"] = "query",
    where: Where = "read",
    key_positions: Sequence[Sequence[int]] | None = None,
    read_position: int = -1,
    controls: Sequence[Head] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> pd.DataFrame:
    """Scale ``(layer, head)``'s queries or keys by each factor; measure the read row of target and controls.

    ``where="read"``: queries at the read position (query arm) / keys at ``key_positions`` (key arm; unpadded
    indices per prompt, None = every real key). ``where="all"``: every position (then the two arms coincide).
    ``controls`` default to the same head one layer up (none for the last layer): a head that reads what the
    target writes, so it can move. Returns one row per (factor, measured head, example): factor, log_factor,
    target, scaled, role
    (target/control), m_layer, m_head, example, entropy, max_attention, k_eff.
    """
    check_layer(pipeline, layer)
    check_head(pipeline, head)
    factors = default_factors() if factors is None else [float(f) for f in factors]
    if any(f <= 0 for f in factors):
        raise ValueError(f"factors must be positive, got {factors}")
    if target not in ("query", "key"):
        raise ValueError(f"target must be 'query' or 'key', got {target!r}")
    if where not in ("read", "all"):
        raise ValueError(f"where must be 'read' or 'all', got {where!r}")
    if controls is None:
        # a head that can move: the same head one layer up reads the residual the scaled head writes to (a head
        # of the same layer cannot: the scaled queries/keys are the target head's own copy)
        controls = [(layer + 1, head)] if layer + 1 < pipeline.num_layers else []
    for cl, ch in controls:
        check_layer(pipeline, cl)
        check_head(pipeline, ch)
    measured = [(layer, head, "target")] + [(cl, ch, "control") for cl, ch in controls if (cl, ch) != (layer, head)]
    if where == "all":
        scaled = f"{target}s at all positions"
    elif target == "query":
        scaled = f"queries at read position {read_position}"
    else:
        scaled = "keys at all real positions" if key_positions is None else "keys at chosen key positions"
    rows_out = []
    prompts = list(prompts)
    for start, chunk in tqdm(list(batches(prompts, max(1, batch_size // len(factors)))), desc=f"scale L{layer}H{head}",
                             disable=not progress):
        batch = pipeline.load(chunk)
        B = batch.input_ids.shape[0]
        F = len(factors)
        rep = batch.select([b for _ in range(F) for b in range(B)])
        # token indices of each row's unpadded prompt; the attention operations convert them (coordinates="prompt")
        read = [_read_index(batch.lengths[b], read_position) for b in range(B)]
        ops: list[Any] = []
        for fi, factor in enumerate(factors):
            rows = list(range(fi * B, (fi + 1) * B))
            if where == "all":
                positions = None
            elif target == "query":
                positions = [[i] for i in read]
            else:
                if key_positions is None:
                    tokens = [list(range(batch.lengths[b])) for b in range(B)]
                else:
                    tokens = [[k + batch.lengths[b] if k < 0 else k for k in key_positions[start + b]] for b in range(B)]
                width = max(len(t) for t in tokens)
                positions = [t + [-1] * (width - len(t)) for t in tokens]
            ops.append(ScaleQK(layer, head, target, factor, positions=positions, rows=rows, coordinates="prompt"))
        layers = sorted({m[0] for m in measured})
        qpos = torch.tensor([[i] for _ in range(F) for i in read])
        ops.append(RecordAttention(layers, query_positions=qpos, coordinates="prompt"))
        with backend_with("attention", pipeline.model).attention(ops) as ctl:
            pipeline.model.base_model(**rep.model_inputs(), use_cache=False)
        key_mask = rep.attention_mask.bool()[:, None, None, :]
        for m_layer, m_head, role in measured:
            probs = ctl.get(m_layer).probs[:, m_head:m_head + 1]  # (F*B, 1, 1, T)
            stats = row_statistics(probs, key_mask.expand_as(probs))
            for r in range(F * B):
                rows_out.append({
                    "factor": factors[r // B], "log_factor": float(np.log(factors[r // B])), "target": target,
                    "scaled": scaled, "layer": layer, "head": head, "role": role, "m_layer": m_layer,
                    "m_head": m_head, "example": start + r % B,
                    "entropy": float(stats["entropy"][r, 0, 0]), "max_attention": float(stats["max_attention"][r, 0, 0]),
                    "k_eff": float(stats["k_eff"][r, 0, 0]),
                })
    return pd.DataFrame(rows_out)


def gain_of(sweep: pd.DataFrame, measure: str = "max_attention") -> dict[str, float]:
    """Slope of the per-factor mean ``measure`` of the target head against ln s, with SE and R²."""
    target = sweep[sweep["role"] == "target"]
    means = target.groupby("log_factor")[measure].mean()
    fit = ols_slope(means.index.to_numpy(), means.to_numpy())
    return {"gain": fit.slope, "gain_se": fit.se, "gain_r2": fit.r2, "n_factors": fit.n,
            f"{measure}_at_1": float(np.interp(0.0, means.index.to_numpy(), means.to_numpy()))}


def gain_table(pipeline: LMPipeline, prompts: Sequence[Any], factors: Sequence[float] | None = None,
               heads: Sequence[Head] | None = None, target: Literal["query", "key"] = "query",
               key_positions: Sequence[Sequence[int]] | None = None, read_position: int = -1,
               batch_size: int = 64, progress: bool = True) -> pd.DataFrame:
    """EXP2: the gain of every head (or ``heads``): one row per (layer, head) with gain, SE, R²."""
    heads = [(l, h) for l in range(pipeline.num_layers) for h in range(pipeline.num_heads)] if heads is None else heads
    out = []
    for layer, head in tqdm(heads, desc=f"{target} gain per head", disable=not progress):
        sweep = scaling_sweep(pipeline, prompts, layer, head, factors, target=target, where="read",
                              key_positions=key_positions, read_position=read_position, controls=[],
                              batch_size=batch_size)
        out.append({"layer": layer, "head": head, "target": target, "scaled": sweep["scaled"].iloc[0],
                    **gain_of(sweep)})
    return pd.DataFrame(out)


def query_vs_key(pipeline: LMPipeline, prompts: Sequence[Any], layer: int, head: int,
                 factors: Sequence[float] | None = None, key_positions: Sequence[Sequence[int]] | None = None,
                 read_position: int = -1, batch_size: int = 64) -> tuple[pd.DataFrame, dict[str, Any]]:
    """EXP3: the same head scaled through its read-position query vs its keys at ``key_positions`` (required:
    with every key scaled the two arms are the same intervention).

    Returns both sweeps (concatenated) and ``{gain_query, gain_key, sensitivity_ratio = gain_query /
    gain_key, ...}`` with what each arm scaled.
    """
    if key_positions is None:
        raise ValueError("query_vs_key needs key_positions: scaling every key a row sees multiplies its logits "
                         "exactly as scaling its query does, so the ratio would be 1 by construction")
    q = scaling_sweep(pipeline, prompts, layer, head, factors, "query", "read", read_position=read_position,
                      controls=[], batch_size=batch_size)
    k = scaling_sweep(pipeline, prompts, layer, head, factors, "key", "read", key_positions=key_positions,
                      read_position=read_position, controls=[], batch_size=batch_size)
    gq, gk = gain_of(q), gain_of(k)
    ratio = gq["gain"] / gk["gain"] if gk["gain"] not in (0.0,) and np.isfinite(gk["gain"]) else np.nan
    summary = {"layer": layer, "head": head, "gain_query": gq["gain"], "gain_query_se": gq["gain_se"],
               "gain_query_r2": gq["gain_r2"], "gain_key": gk["gain"], "gain_key_se": gk["gain_se"],
               "gain_key_r2": gk["gain_r2"], "sensitivity_ratio": ratio,
               "query_scaled": q["scaled"].iloc[0], "key_scaled": k["scaled"].iloc[0]}
    return pd.concat([q, k], ignore_index=True), summary
