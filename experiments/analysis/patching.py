"""Activation patching: run the corrupted prompt with the clean run's residual at one (layer, position)
and measure how much of the clean behaviour comes back.

Metric at the read position (default: the last prompt token): ``m = log p(clean answer's first token) -
log p(corrupted answer's first token)``. Recovery = (m_patched - m_corrupted) / (m_clean - m_corrupted):
1 = the patch restores the clean prediction, 0 = no effect. Clean and corrupted prompts must have the same
number of tokens (position i is patched from position i). Layer -1 is the embeddings.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments.analysis.model_access import residual_stream
from experiments.backends import DEFAULT_BACKEND, make_backend
from experiments.pipeline import LMPipeline
from experiments.backends.sites import Site, SitePatch


def _site(layer: int) -> Site:
    return Site(0, "block_input") if layer < 0 else Site(layer, "block_output")


def _metric(logits: torch.Tensor, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)
    rows = torch.arange(len(clean_ids))
    return logp[rows, clean_ids] - logp[rows, corrupt_ids]


@torch.no_grad()
def activation_patching(pipeline: LMPipeline, clean: Sequence[Any], corrupted: Sequence[Any],
                        layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                        read_position: int = -1, progress: bool = True) -> pd.DataFrame:
    """One row per (pair, layer, position): metric_clean, metric_corrupted, metric_patched, recovery.

    ``positions``: unpadded token indices to patch (None: every token). Pairs whose clean and corrupted first
    answer tokens coincide are skipped (recovery undefined).
    """
    if len(clean) != len(corrupted):
        raise ValueError(f"{len(clean)} clean prompts but {len(corrupted)} corrupted ones")
    layers = list(range(-1, pipeline.num_layers)) if layers is None else list(layers)
    backend = make_backend(DEFAULT_BACKEND, pipeline.model)
    rows = []
    for i in tqdm(range(len(clean)), desc="activation patching", disable=not progress):
        cb, xb = pipeline.load([clean[i]]), pipeline.load([corrupted[i]])
        if cb.lengths[0] != xb.lengths[0]:
            raise ValueError(f"pair {i}: clean prompt has {cb.lengths[0]} tokens, corrupted {xb.lengths[0]}")
        T = cb.lengths[0]
        read = read_position + T if read_position < 0 else read_position
        clean_logits = pipeline.model(**cb.model_inputs()).logits[:, read]
        corrupt_logits = pipeline.model(**xb.model_inputs()).logits[:, read]
        clean_id, corrupt_id = clean_logits.argmax(-1), corrupt_logits.argmax(-1)
        if int(clean_id) == int(corrupt_id):
            continue
        m_clean = float(_metric(clean_logits, clean_id, corrupt_id)[0])
        m_corrupt = float(_metric(corrupt_logits, clean_id, corrupt_id)[0])
        residual = residual_stream(pipeline, cb, layers)
        cols = list(range(T)) if positions is None else [p + T if p < 0 else p for p in positions]
        for layer in layers:
            # one row per patched position, all in one forward
            n = len(cols)
            batch = xb.select([0] * n)
            columns = torch.tensor([[c] for c in cols], device=pipeline.device)
            values = residual[layer][0, cols][:, None, :]
            out = backend.prompt_pass({**batch.model_inputs(), "logits_to_keep": 0},  # full model: logits everywhere
                                      [SitePatch(_site(layer), columns, values)])
            patched = _metric(out.logits[:, read], clean_id.expand(n), corrupt_id.expand(n))
            for c, m in zip(cols, patched.tolist()):
                rows.append({"pair": i, "clean": clean[i]["raw_input"] if isinstance(clean[i], dict) else clean[i],
                             "corrupted": corrupted[i]["raw_input"] if isinstance(corrupted[i], dict) else corrupted[i],
                             "layer": layer, "position": c, "metric_clean": m_clean, "metric_corrupted": m_corrupt,
                             "metric_patched": m,
                             "recovery": (m - m_corrupt) / (m_clean - m_corrupt) if m_clean != m_corrupt else np.nan})
    return pd.DataFrame(rows)


def recovery_grid(table: pd.DataFrame) -> pd.DataFrame:
    """Mean recovery as a layer × position grid."""
    return table.pivot_table(index="layer", columns="position", values="recovery", aggfunc="mean")
