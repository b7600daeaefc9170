"""Linear probes across layers and positions: is a variable linearly decodable from the residual stream?

For each (layer, position) a multinomial logistic regression (plain torch, L-BFGS, L2 penalty, features
standardised on the training split) is fit on a training split and scored on a held-out split. The
control is the same probe trained on *shuffled* training labels and scored on the true held-out labels
(it measures what a probe gets from label frequencies and chance). Accuracies come with 95% Wilson CIs;
``above_control`` = the probe's CI lies entirely above the control's accuracy.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments.analysis.model_access import batches, residual_stream
from experiments.analysis.stats import wilson_interval
from experiments.pipeline import LMPipeline


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-2, steps: int = 60
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on (N, d) features, labels 0..C-1. Returns (W, b, mean, std)."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + l2 * (w ** 2).sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


def predict_logistic(params: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    w, b, mean, std = params
    return (((x.double() - mean) / std) @ w + b).argmax(-1)


@torch.no_grad()
def collect_features(pipeline: LMPipeline, prompts: Sequence[Any], positions: Sequence[dict[str, int]],
                     layers: Sequence[int] | None = None, batch_size: int = 64, progress: bool = True
                     ) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, position name): (N, d)}`` residual vectors; ``positions[i]`` names unpadded indices of prompt i.

    Only the named positions are kept (memory: layers × names × N × d).
    """
    names = list(positions[0])
    if any(list(p) != names for p in positions):
        raise ValueError("every prompt must name the same positions")
    out: dict[tuple[int, str], list[torch.Tensor]] = {}
    prompts = list(prompts)
    for start, chunk in tqdm(list(batches(prompts, batch_size)), desc="probe features", disable=not progress):
        batch = pipeline.load(chunk)
        residual = residual_stream(pipeline, batch, layers)
        rows = torch.arange(len(chunk))
        for name in names:
            cols = torch.tensor([batch.pad_offsets[b] + positions[start + b][name] for b in range(len(chunk))])
            for layer, hidden in residual.items():
                out.setdefault((layer, name), []).append(hidden[rows, cols].float().cpu())
    return {key: torch.cat(parts) for key, parts in out.items()}


def probe_table(features: dict[tuple[int, str], torch.Tensor], labels: Sequence[int], variable: str,
                test_fraction: float = 0.3, seed: int = 0, l2: float = 1e-2) -> pd.DataFrame:
    """Probe accuracy per (layer, position) with the shuffled-label control; one row each."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    classes, y = torch.unique(y, return_inverse=True)
    n = len(y)
    if n < 10:
        raise ValueError(f"need at least 10 examples to probe, got {n}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_test = max(1, int(round(test_fraction * n)))
    test, train = order[:n_test], order[n_test:]
    shuffled = y[train][torch.randperm(len(train), generator=gen)]
    majority = float((y[test] == torch.bincount(y[train], minlength=len(classes)).argmax()).float().mean())
    rows = []
    for (layer, name), x in features.items():
        if len(x) != n:
            raise ValueError(f"features at {(layer, name)} have {len(x)} rows for {n} labels")
        if len(classes) < 2:
            acc = ctrl = 1.0
        else:
            probe = fit_logistic(x[train], y[train], len(classes), l2)
            acc = float((predict_logistic(probe, x[test]) == y[test]).float().mean())
            control = fit_logistic(x[train], shuffled, len(classes), l2)
            ctrl = float((predict_logistic(control, x[test]) == y[test]).float().mean())
        lo, hi = wilson_interval(round(acc * n_test), n_test)
        clo, chi = wilson_interval(round(ctrl * n_test), n_test)
        rows.append({"variable": variable, "layer": layer, "position": name, "accuracy": acc, "ci_low": lo,
                     "ci_high": hi, "control_accuracy": ctrl, "control_ci_low": clo, "control_ci_high": chi,
                     "majority_baseline": majority, "n_train": len(train), "n_test": n_test,
                     "n_classes": len(classes), "above_control": lo > ctrl})
    return pd.DataFrame(rows)


def probe_variables(pipeline: LMPipeline, settings: Sequence[dict[str, Any]], variables: Sequence[str],
                    labels_of: Any, positions_of: Any, layers: Sequence[int] | None = None,
                    batch_size: int = 64, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Probe every variable at every (layer, named position); ``labels_of(settings, variable)``,
    ``positions_of(pipeline, setting)`` come from the task. Features are collected once."""
    positions = [positions_of(pipeline, s) for s in settings]
    features = collect_features(pipeline, settings, positions, layers, batch_size, progress)
    tables = [probe_table(features, labels_of(settings, v), v, seed=seed) for v in variables]
    return pd.concat(tables, ignore_index=True)
