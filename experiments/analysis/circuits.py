"""Circuit helpers: heads ranked by where they look from a read position; neurons ranked by how well they
separate task classes.

Head ranking: for each (layer, head), the attention mass from the query position(s) to the tokens of a
role (e.g. the operator or the carry-producing digits), averaged over the prompts where the role is present,
next to the uniform baseline (role tokens / keys visible to the query). ``lift`` = mass / baseline.
Neuron ranking: for each MLP neuron at the read position, Cohen's d between two classes (|mean difference| /
pooled SD) or, for more classes, the ANOVA F statistic (between- over within-class variance).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments.analysis.model_access import batches, neuron_activations, teacher_forced
from experiments.backends.attention_control import RecordAttention
from experiments.backends import backend_with
from experiments.pipeline import LMPipeline

Roles = Callable[[LMPipeline, dict[str, Any]], dict[str, list[int]]]


@torch.no_grad()
def role_attention(pipeline: LMPipeline, settings: Sequence[dict[str, Any]], roles_of: Roles,
                   answers: Sequence[str] | None = None, batch_size: int = 32, progress: bool = True
                   ) -> pd.DataFrame:
    """Per (example, step, layer, head, role): attention mass from the read position to the role's tokens.

    Without ``answers``: step 0 = the last prompt token. With ``answers`` (teacher forced): step i = the
    position predicting answer token i (step 0 is still the last prompt token). Only those query rows are
    recorded (memory: B × H × steps × T per layer).
    """
    rows = []
    settings = list(settings)
    layers = list(range(pipeline.num_layers))
    for start, chunk in tqdm(list(batches(settings, batch_size)), desc="role attention", disable=not progress):
        if answers is not None:
            forced = teacher_forced(pipeline, chunk, answers[start:start + len(chunk)], add_eos=False)
            batch, columns = forced.batch, forced.answer_columns
        else:
            batch = pipeline.load(chunk)
            columns = [[batch.input_ids.shape[1] - 1] for _ in chunk]
        width = max(len(c) for c in columns)
        qpos = torch.tensor([c + [c[-1]] * (width - len(c)) for c in columns])
        with backend_with("attention", pipeline.model).attention([RecordAttention(layers, query_positions=qpos,
                                                                                     coordinates="cache")]) as ctl:
            pipeline.model.base_model(**batch.model_inputs(), use_cache=False)
        roles = [roles_of(pipeline, s) for s in chunk]
        for layer in layers:
            probs = ctl.get(layer).probs.float().cpu()  # (B, H, width, T)
            for b in range(len(chunk)):
                off = batch.pad_offsets[b]
                for step, col in enumerate(columns[b]):
                    visible = col - off + 1
                    for role, tokens in roles[b].items():
                        if not tokens:
                            continue
                        mass = probs[b, :, step, [off + t for t in tokens]].sum(-1)
                        for head in range(probs.shape[1]):
                            rows.append({"example": start + b, "step": step, "layer": layer, "head": head,
                                         "role": role, "mass": float(mass[head]),
                                         "baseline": len(tokens) / visible})
    return pd.DataFrame(rows)


def rank_heads(table: pd.DataFrame, role: str, step: int | None = 0) -> pd.DataFrame:
    """Heads ordered by mean attention mass to ``role`` (at answer ``step``; None pools every step)."""
    sel = table[table["role"] == role]
    if step is not None:
        sel = sel[sel["step"] == step]
    if sel.empty:
        raise ValueError(f"no attention rows for role {role!r} at step {step}; roles: {sorted(table['role'].unique())}")
    ranked = sel.groupby(["layer", "head"], as_index=False).agg(
        mass=("mass", "mean"), baseline=("baseline", "mean"), n=("example", "nunique"))
    ranked["lift"] = ranked["mass"] / ranked["baseline"]
    ranked.insert(0, "role", role)
    return ranked.sort_values("mass", ascending=False, ignore_index=True)


def separation_scores(acts: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Per column of ``acts`` (N, n): Cohen's d for two classes, the ANOVA F statistic for more."""
    y = np.asarray(labels)
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError("need at least two classes to score separation")
    acts = np.asarray(acts, dtype=float)
    if len(classes) == 2:
        a, b = acts[y == classes[0]], acts[y == classes[1]]
        pooled = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2))
        return np.abs(a.mean(0) - b.mean(0)) / np.maximum(pooled, 1e-12)
    grand = acts.mean(0)
    between = sum((y == c).sum() * (acts[y == c].mean(0) - grand) ** 2 for c in classes) / (len(classes) - 1)
    within = sum(((acts[y == c] - acts[y == c].mean(0)) ** 2).sum(0) for c in classes) / (len(y) - len(classes))
    return between / np.maximum(within, 1e-12)


@torch.no_grad()
def rank_neurons(pipeline: LMPipeline, settings: Sequence[dict[str, Any]], labels: Sequence[int],
                 layers: Sequence[int] | None = None, read_position: int = -1, top: int = 20,
                 batch_size: int = 64) -> pd.DataFrame:
    """The ``top`` MLP neurons (all layers by default) by class separation at the read position."""
    layers = list(range(pipeline.num_layers)) if layers is None else list(layers)
    parts: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    settings = list(settings)
    for _, chunk in batches(settings, batch_size):
        batch = pipeline.load(chunk)
        acts = neuron_activations(pipeline, batch, layers)
        cols = torch.tensor([batch.pad_offsets[b] + (read_position + batch.lengths[b] if read_position < 0
                                                     else read_position) for b in range(len(chunk))])
        for layer in layers:
            parts[layer].append(acts[layer][torch.arange(len(chunk)), cols].float().cpu().numpy())
    y = np.asarray(labels)
    rows = []
    for layer in layers:
        a = np.concatenate(parts[layer])
        score = separation_scores(a, y)
        classes = np.unique(y)
        for n in np.argsort(-score)[:top]:
            rows.append({"layer": layer, "neuron": int(n), "score": float(score[n]),
                         "metric": "cohens_d" if len(classes) == 2 else "anova_f",
                         **{f"mean_class_{c}": float(a[y == c, n].mean()) for c in classes}})
    return pd.DataFrame(rows).sort_values("score", ascending=False, ignore_index=True).head(top)
