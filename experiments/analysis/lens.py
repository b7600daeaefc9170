"""Logit lens: the final norm and the unembedding applied to the residual stream after every block.

At the last block the lens equals the model's own logits (final softcap included). ``translator``
is the hook for a tuned lens: ``translator(layer, residual) -> residual`` runs before the final norm
(identity by default). Layers are block indices, -1 = the embeddings.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments.analysis.model_access import (
    batches,
    final_norm,
    residual_stream,
    teacher_forced,
)
from experiments.pipeline import LMPipeline, PromptBatch

Translator = Callable[[int, torch.Tensor], torch.Tensor]


@torch.no_grad()
def lens_logits(pipeline: LMPipeline, batch: PromptBatch, layers: Sequence[int] | None = None,
                translator: Translator | None = None) -> dict[int, torch.Tensor]:
    """``{layer: (B, T, V) logits}`` read off the residual after each block in ``layers`` (None: all, -1 too)."""
    residual = residual_stream(pipeline, batch, layers)
    norm = final_norm(pipeline.model)
    out = {}
    for layer, hidden in residual.items():
        if translator is not None:
            hidden = translator(layer, hidden)
        out[layer] = pipeline.project(norm(hidden))
    return out


@torch.no_grad()
def logit_lens(pipeline: LMPipeline, prompts: Sequence[Any], answers: Sequence[str] | None = None,
               translator: Translator | None = None, batch_size: int = 32, top_k: int = 1,
               progress: bool = True) -> pd.DataFrame:
    """Per (example, layer, answer step): the lens's top-1 token, its probability, the entropy of the lens
    distribution, and the probability and rank of the target token.

    With ``answers`` the prompt and answer are run teacher-forced and step i is the position that predicts
    answer token i; without, one step at the last prompt token whose target is the model's own top-1.
    ``top1_is_target`` marks where the lens already outputs the target.
    """
    rows = []
    prompts = list(prompts)
    for start, chunk in tqdm(list(batches(prompts, batch_size)), desc="logit lens", disable=not progress):
        if answers is not None:
            forced = teacher_forced(pipeline, chunk, answers[start:start + len(chunk)])
            batch, columns, targets = forced.batch, forced.answer_columns, forced.answer_ids
        else:
            batch = pipeline.load(chunk)
            columns = [[batch.input_ids.shape[1] - 1] for _ in chunk]
            targets = None
        per_layer = lens_logits(pipeline, batch, translator=translator)
        final = per_layer[pipeline.num_layers - 1]
        for layer, logits in per_layer.items():
            logp = logits.log_softmax(-1)
            probs = logp.exp()
            entropy = -(probs * logp).nan_to_num().sum(-1)
            top_p, top_id = probs.max(-1)
            for b in range(len(chunk)):
                for step, col in enumerate(columns[b]):
                    target = targets[b][step] if targets is not None else int(final[b, col].argmax())
                    rank = int((logits[b, col] > logits[b, col, target]).sum())
                    rows.append({
                        "example": start + b, "layer": layer, "step": step, "position": col - batch.pad_offsets[b],
                        "target_id": target, "target_token": pipeline.tokenizer.convert_ids_to_tokens(target),
                        "top1_id": int(top_id[b, col]),
                        "top1_token": pipeline.tokenizer.convert_ids_to_tokens(int(top_id[b, col])),
                        "top1_prob": float(top_p[b, col]), "target_prob": float(probs[b, col, target]),
                        "target_logprob": float(logp[b, col, target]), "target_rank": rank,
                        "entropy": float(entropy[b, col]), "top1_is_target": rank == 0,
                    })
    return pd.DataFrame(rows)


def first_decodable_layer(lens: pd.DataFrame) -> pd.DataFrame:
    """Per (example, step): the first layer from which the lens's top-1 is the target at every later layer
    (NaN if not even at the last layer)."""
    out = []
    for (example, step), g in lens.sort_values("layer").groupby(["example", "step"]):
        hits = g["top1_is_target"].to_numpy()
        layers = g["layer"].to_numpy()
        first = np.nan
        for i in range(len(hits)):
            if hits[i:].all():
                first = float(layers[i])
                break
        out.append({"example": example, "step": step, "first_layer": first})
    return pd.DataFrame(out)


def lens_summary(lens: pd.DataFrame) -> pd.DataFrame:
    """Per (step, layer): fraction of examples whose lens top-1 is the target, mean target prob, mean entropy."""
    return lens.groupby(["step", "layer"], as_index=False).agg(
        top1_accuracy=("top1_is_target", "mean"), target_prob=("target_prob", "mean"),
        entropy=("entropy", "mean"), n=("example", "count"))
