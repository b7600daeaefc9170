"""Ablations of attention blocks, MLPs and single heads: importance as the change in task accuracy and
in the answer's log-probability; cumulative ablation curves.

A target is ``("attention", layer)``, ``("mlp", layer)`` or ``("head", layer, head)``. ``zero`` writes
zeros, ``mean`` writes the component's mean over the real tokens of reference prompts. Ablations act at
every position of every forward inside :func:`ablated` (the prompt pass and each decoding step), as site
edits of the backend (heads: the head's slice of the output projection's input). This is the engine's meaning of
an ablation (the value is written at the unit's token positions whenever they are computed) with every token as
the position: an engine cell names prompt tokens, so its ablation acts in the prompt pass only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments.analysis.model_access import (
    answer_logprob,
    batches,
    check_head,
    check_layer,
    teacher_forced,
)
from experiments.backends import DEFAULT_BACKEND, backend_with, make_backend
from experiments.pipeline import LMPipeline
from experiments.backends.sites import Site, SiteEdit

Target = tuple
Kind = Literal["zero", "mean"]
_COMPONENT = {"attention": "attention_output", "mlp": "mlp_output", "head": "head_attention_value_output"}


def target_name(target: Target) -> str:
    """``attn L2`` / ``mlp L2`` / ``L2H1``."""
    return f"L{target[1]}H{target[2]}" if target[0] == "head" else f"{target[0]} L{target[1]}"


def _check_target(pipeline: LMPipeline, target: Target) -> Site:
    if not target or target[0] not in _COMPONENT:
        raise ValueError(f"ablation target must be ('attention', l), ('mlp', l) or ('head', l, h); got {target!r}")
    check_layer(pipeline, target[1])
    if target[0] == "head":
        if len(target) != 3:
            raise ValueError(f"a head target is ('head', layer, head), got {target!r}")
        check_head(pipeline, target[2])
    return Site(target[1], _COMPONENT[target[0]])


@torch.no_grad()
def component_means(pipeline: LMPipeline, prompts: Sequence[Any], targets: Sequence[Target],
                    batch_size: int = 64) -> dict[Target, torch.Tensor]:
    """Mean activation of each target's component over every real token of ``prompts``: (d,) or (d_head,)."""
    backend = make_backend(DEFAULT_BACKEND, pipeline.model)
    sites = sorted({_check_target(pipeline, t) for t in targets}, key=lambda s: (s.layer, s.component))
    sums: dict[Site, torch.Tensor] = {}
    count = 0
    for _, chunk in batches(list(prompts), batch_size):
        batch = pipeline.load(chunk)
        acts = backend.collect(sites, batch.model_inputs())
        real = batch.attention_mask.bool()
        count += int(real.sum())
        for site, t in acts.items():
            sums[site] = sums.get(site, 0) + t[real].double().sum(0)
    out = {}
    for target in targets:
        mean = sums[_check_target(pipeline, target)] / max(count, 1)
        out[target] = mean[target[2]] if target[0] == "head" else mean
    return out


@contextmanager
def ablated(pipeline: LMPipeline, targets: Sequence[Target], kind: Kind = "zero",
            means: dict[Target, torch.Tensor] | None = None) -> Iterator[None]:
    """Every forward inside the block runs with ``targets`` ablated (no targets: the model unchanged)."""
    if kind not in ("zero", "mean"):
        raise ValueError(f"kind must be 'zero' or 'mean', got {kind!r}")
    if kind == "mean" and (means is None or any(t not in means for t in targets)):
        raise ValueError("mean ablation needs means for every target (component_means)")
    by_site: dict[Site, list[Target]] = {}
    for target in targets:
        by_site.setdefault(_check_target(pipeline, target), []).append(target)

    def writer(site_targets: list[Target]) -> Callable[[torch.Tensor], torch.Tensor]:
        def write(t: torch.Tensor) -> torch.Tensor:  # (B, T, d), or (B, T, H, d_head) at a head site
            t = t.clone()
            for target in site_targets:
                value = 0.0 if kind == "zero" else means[target].to(t.device, t.dtype)
                if target[0] == "head":
                    t[..., target[2], :] = value
                else:
                    t[...] = value
            return t
        return write

    backend = backend_with("edits", pipeline.model)
    with backend.edits([SiteEdit(site, writer(site_targets)) for site, site_targets in by_site.items()]):
        yield


@torch.no_grad()
def evaluate(pipeline: LMPipeline, settings: Sequence[dict[str, Any]], answer_of: Any, check: Any,
             max_new_tokens: int, batch_size: int = 64) -> dict[str, float]:
    """Task accuracy (greedy answers, the task's checker) and mean answer log-prob (teacher forced, EOS included)
    of the model as it runs now (inside :func:`ablated` when ablating)."""
    correct, logps = [], []
    for _, chunk in batches(list(settings), batch_size):
        generation = pipeline.generate(chunk, max_new_tokens=max_new_tokens)
        texts = [pipeline.dump([ids[:n]])[0] for ids, n in zip(generation.token_ids.tolist(), generation.lengths)]
        correct += [bool(check(t, s)) for t, s in zip(texts, chunk)]
        forced = teacher_forced(pipeline, chunk, [answer_of(s) for s in chunk])
        logps += answer_logprob(pipeline, forced).tolist()
    return {"accuracy": float(np.mean(correct)), "answer_logprob": float(np.mean(logps)), "n": len(correct)}


def importance(pipeline: LMPipeline, settings: Sequence[dict[str, Any]], targets: Sequence[Target],
               answer_of: Any, check: Any, max_new_tokens: int, kind: Kind = "zero",
               reference: Sequence[dict[str, Any]] | None = None, batch_size: int = 64,
               progress: bool = True) -> pd.DataFrame:
    """Ablate each target alone: accuracy, answer log-prob, and their drops from the clean model."""
    means = component_means(pipeline, reference or settings, targets, batch_size) if kind == "mean" else None
    clean = evaluate(pipeline, settings, answer_of, check, max_new_tokens, batch_size)
    rows = []
    for target in tqdm(targets, desc=f"{kind} ablation", disable=not progress):
        with ablated(pipeline, [target], kind, means):
            got = evaluate(pipeline, settings, answer_of, check, max_new_tokens, batch_size)
        rows.append({"target": target_name(target), "component": target[0], "layer": target[1],
                     "head": target[2] if target[0] == "head" else -1, "kind": kind,
                     "accuracy": got["accuracy"], "answer_logprob": got["answer_logprob"],
                     "accuracy_drop": clean["accuracy"] - got["accuracy"],
                     "logprob_drop": clean["answer_logprob"] - got["answer_logprob"],
                     "clean_accuracy": clean["accuracy"], "clean_logprob": clean["answer_logprob"], "n": got["n"]})
    return pd.DataFrame(rows)


def cumulative_ablation(pipeline: LMPipeline, settings: Sequence[dict[str, Any]], ordered: Sequence[Target],
                        answer_of: Any, check: Any, max_new_tokens: int, kind: Kind = "zero",
                        reference: Sequence[dict[str, Any]] | None = None, batch_size: int = 64,
                        progress: bool = True) -> pd.DataFrame:
    """Ablate the first k targets of ``ordered`` together, k = 0..len: accuracy and log-prob per k."""
    means = component_means(pipeline, reference or settings, ordered, batch_size) if kind == "mean" else None
    rows = []
    for k in tqdm(range(len(ordered) + 1), desc="cumulative ablation", disable=not progress):
        with ablated(pipeline, list(ordered[:k]), kind, means):
            got = evaluate(pipeline, settings, answer_of, check, max_new_tokens, batch_size)
        rows.append({"k": k, "last_added": target_name(ordered[k - 1]) if k else "", "kind": kind, **got})
    return pd.DataFrame(rows)
