"""Attention profiler: entropy, max attention, k_eff, query/key norms per (example, layer, head, query position).

Reads the probabilities the model itself runs (``RecordAttention``: after rotary, masks, softcap and
any intervention), never a recomputation from Q and K. Queries and keys are recorded after rotary;
query head ``h`` reads kv head ``h // n_rep`` (``n_rep = heads / kv_heads``).

Statistics of one attention row ``p`` over its real keys (padding keys carry 0 and are ignored):
- ``entropy`` = -Σ p log p (nats); uniform over n keys → log n, one-hot → 0;
- ``max_attention`` = max p;
- ``k_eff`` = the smallest number of keys whose mass reaches ``mass`` (0.9); uniform → ⌈0.9 n⌉, one-hot → 1;
- ``perplexity`` = exp(entropy) (the "effective number of keys" by entropy).
With ``sink_tokens = k`` the first k real tokens are dropped and the row renormalised before the statistics
(``sink_mass`` keeps the mass they held).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments.analysis.model_access import batches, check_head, check_layer
from experiments.backends.attention_control import RecordAttention
from experiments.backends import backend_with
from experiments.pipeline import LMPipeline

STAT_COLUMNS = ("entropy", "max_attention", "k_eff", "perplexity", "sink_mass", "query_norm", "key_norm",
                "attended_key_norm", "n_keys")


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """-Σ p log p over the last axis (0 log 0 = 0), in nats."""
    p = probs.double()
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1)


def k_effective(probs: torch.Tensor, mass: float = 0.9) -> torch.Tensor:
    """Smallest number of keys whose summed probability reaches ``mass`` of the row's total (0 for an empty row)."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    p = probs.double()
    total = p.sum(-1, keepdim=True)
    cumulative = p.sort(-1, descending=True).values.cumsum(-1)
    reached = cumulative >= mass * total - 1e-9 * total.clamp_min(1)
    k = (~reached).sum(-1) + 1
    return torch.where(total.squeeze(-1) > 0, k, torch.zeros_like(k))


def _sliding_window(pipeline: LMPipeline, layer: int) -> int | None:
    """The sliding window of ``layer`` (keys at distance < window are visible), None for full attention."""
    config = pipeline.model.config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or types is None or types[layer] != "sliding_attention":
        return None
    return int(window)


def row_statistics(probs: torch.Tensor, key_mask: torch.Tensor, mass: float = 0.9, sink_tokens: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Statistics of attention rows ``probs`` (..., K) restricted to keys in ``key_mask`` (..., K) bool.

    Keys outside the mask are removed and the rest renormalised; ``sink_tokens`` are already folded into
    ``key_mask`` by the caller. Returns entropy, max_attention, k_eff, perplexity, n_keys, kept_mass.
    """
    p = torch.where(key_mask, probs.double(), torch.zeros((), dtype=torch.float64, device=probs.device))
    kept = p.sum(-1)
    p = p / kept.clamp_min(1e-300)[..., None]
    entropy = attention_entropy(p)
    return {
        "entropy": entropy,
        "max_attention": p.max(-1).values,
        "k_eff": k_effective(p, mass).double(),
        "perplexity": entropy.exp(),
        "n_keys": key_mask.sum(-1).double(),
        "kept_mass": kept,
    }


def profile_attention(
    pipeline: LMPipeline,
    prompts: Sequence[Any],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    query_positions: Sequence[int] | None = None,
    sink_tokens: int = 0,
    mass: float = 0.9,
    batch_size: int = 32,
    max_bytes: int = 512 * 2**20,
    progress: bool = True,
) -> pd.DataFrame:
    """Tidy table, one row per (example, layer, head, query position) of real (non-padding) tokens.

    ``query_positions``: unpadded token indices (negative = from the end; None = every token). Columns:
    example, layer, head, kv_head, position (unpadded index), token, and :data:`STAT_COLUMNS`. Layers are
    recorded in chunks so that at most ``max_bytes`` of probabilities are alive at once.
    """
    layers = list(range(pipeline.num_layers)) if layers is None else [check_layer(pipeline, l) for l in layers]
    heads = list(range(pipeline.num_heads)) if heads is None else [check_head(pipeline, h) for h in heads]
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be ≥ 0, got {sink_tokens}")
    n_rep = pipeline.num_heads // pipeline.num_kv_heads
    frames = []
    chunks = list(batches(list(prompts), batch_size))
    for start, chunk in tqdm(chunks, desc="attention profile", disable=not progress):
        batch = pipeline.load(chunk)
        B, T = batch.input_ids.shape
        per_layer = B * pipeline.num_heads * T * T * 8
        step = max(1, int(max_bytes // max(per_layer, 1)))
        real = batch.attention_mask.bool()  # (B, T)
        offsets = torch.tensor(batch.pad_offsets, device=real.device)
        unpadded = torch.arange(T, device=real.device)[None, :] - offsets[:, None]  # (B, T)
        key_mask = real & (unpadded >= sink_tokens)  # (B, K)
        causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
        mask = key_mask[:, None, None, :] & causal[None, None]  # (B, 1, Q, K)
        qmask = real.clone()
        if query_positions is not None:
            wanted = torch.zeros_like(real)
            for b in range(B):
                for q in query_positions:
                    j = q + batch.lengths[b] if q < 0 else q
                    if not 0 <= j < batch.lengths[b]:
                        raise ValueError(f"query position {q} outside prompt {b} of {batch.lengths[b]} tokens")
                    wanted[b, batch.pad_offsets[b] + j] = True
            qmask &= wanted
        for lstart in range(0, len(layers), step):
            chunk_layers = layers[lstart:lstart + step]
            with backend_with("attention", pipeline.model).attention([RecordAttention(chunk_layers, heads=heads,
                                                                    what=("probs", "query", "key"))]) as ctl:
                with torch.no_grad():
                    pipeline.model.base_model(**batch.model_inputs(), use_cache=False)
            for layer in chunk_layers:
                rec = ctl.get(layer)
                probs = rec.probs.double()  # (B, h, T, T)
                window = _sliding_window(pipeline, layer)
                if window is None:
                    visible = mask
                else:  # keys at distance < window (real tokens are contiguous, so column distance = token distance)
                    cols_t = torch.arange(T, device=real.device)
                    visible = mask & ((cols_t[:, None] - cols_t[None, :]) < window)[None, None]
                stats = row_statistics(probs, visible.expand_as(probs), mass)
                sink = (probs * (~key_mask)[:, None, None, :]).sum(-1)
                qnorm = rec.query.double().norm(dim=-1)  # (B, h, T)
                kv_index = torch.tensor([h // n_rep for h in heads], device=rec.key.device)
                knorm = rec.key.double().norm(dim=-1).index_select(1, kv_index)  # (B, h, K)
                attended = (probs * knorm[:, :, None, :]).sum(-1)
                rows_b, cols = qmask.nonzero(as_tuple=True)
                for hi, head in enumerate(heads):
                    data = {
                        "example": (rows_b + start).cpu().numpy(),
                        "layer": layer, "head": head, "kv_head": head // n_rep,
                        "position": unpadded[rows_b, cols].cpu().numpy(),
                        "token": batch.input_ids[rows_b, cols].cpu().numpy(),
                    }
                    for name in ("entropy", "max_attention", "k_eff", "perplexity", "n_keys"):
                        data[name] = stats[name][rows_b, hi, cols].cpu().numpy()
                    # nothing is set aside at sink_tokens=0: the mass is not measured there, not 0
                    data["sink_mass"] = (sink[rows_b, hi, cols].cpu().numpy() if sink_tokens
                                         else np.full(len(cols), np.nan))
                    data["query_norm"] = qnorm[rows_b, hi, cols].cpu().numpy()
                    data["key_norm"] = knorm[rows_b, hi, cols].cpu().numpy()
                    data["attended_key_norm"] = attended[rows_b, hi, cols].cpu().numpy()
                    frames.append(pd.DataFrame(data))
            del ctl
    table = pd.concat(frames, ignore_index=True)
    # rows whose every key was excluded (position < sink_tokens) have no statistics
    empty = table["n_keys"] == 0
    table.loc[empty, ["entropy", "max_attention", "k_eff", "perplexity"]] = np.nan
    return table


def per_head_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of every statistic per (layer, head) over examples and query positions."""
    cols = [c for c in STAT_COLUMNS if c in table]
    return table.groupby(["layer", "head"], as_index=False)[cols].mean()


@torch.no_grad()
def attention_matrices(pipeline: LMPipeline, prompt: Any, layer: int) -> tuple[np.ndarray, list[str]]:
    """Every head of ``layer`` for one prompt: (H, T, T) probabilities and the token strings."""
    check_layer(pipeline, layer)
    batch = pipeline.load([prompt])
    with backend_with("attention", pipeline.model).attention([RecordAttention([layer])]) as ctl:
        pipeline.model.base_model(**batch.model_inputs(), use_cache=False)
    tokens = pipeline.tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
    return ctl.get(layer).probs[0].float().cpu().numpy(), tokens
