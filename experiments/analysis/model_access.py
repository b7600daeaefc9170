"""What the analyses need to reach inside a model: residual stream, final norm, unembedding, neurons.

Built on the component map of ``experiments.backends.architectures`` (no per-model code elsewhere). The
residual stream has ``L + 1`` layers here: index 0 is the embeddings (the input of block 0) and
index ``l + 1`` the output of block ``l``; public functions name them by *block* index
``-1 .. L-1`` (``-1`` = embeddings), as the rest of the project does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from experiments.backends.architectures import family_of, get_module
from experiments.backends import DEFAULT_BACKEND, make_backend
from experiments.pipeline import LMPipeline, PromptBatch
from experiments.backends.sites import Site

def check_layer(pipeline: LMPipeline, layer: int, allow_embeddings: bool = False) -> int:
    """``layer`` if it is a block index of the model (or -1 for the embeddings when allowed), else ValueError."""
    low = -1 if allow_embeddings else 0
    if not isinstance(layer, int) or not low <= layer < pipeline.num_layers:
        raise ValueError(f"layer {layer!r} out of range: the model has layers {low}..{pipeline.num_layers - 1}")
    return layer


def check_head(pipeline: LMPipeline, head: int) -> int:
    """``head`` if it is a query-head index of the model, else ValueError."""
    if not isinstance(head, int) or not 0 <= head < pipeline.num_heads:
        raise ValueError(f"head {head!r} out of range: the model has heads 0..{pipeline.num_heads - 1}")
    return head


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm between the last block and the unembedding (``model.norm`` / ``transformer.ln_f``)."""
    return get_module(model, family_of(model).final_norm)


@torch.no_grad()
def residual_stream(pipeline: LMPipeline, batch: PromptBatch | dict[str, torch.Tensor],
                    layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """Residual stream ``{block index (-1 = embeddings): (B, T, d)}`` for ``layers`` (None: all, -1 included)."""
    wanted = list(range(-1, pipeline.num_layers)) if layers is None else [check_layer(pipeline, l, True) for l in layers]
    sites = {layer: Site.of_unit(layer, "block_output") for layer in wanted}
    inputs = batch.model_inputs() if isinstance(batch, PromptBatch) else batch
    states = make_backend(DEFAULT_BACKEND, pipeline.model).collect(list(sites.values()), inputs)
    return {layer: states[site] for layer, site in sites.items()}


@torch.no_grad()
def neuron_activations(pipeline: LMPipeline, batch: PromptBatch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """MLP hidden activations ``{layer: (B, T, d_mlp)}`` (the input of the MLP's output projection)."""
    sites = {check_layer(pipeline, layer): Site(layer, "mlp_neurons") for layer in layers}
    states = make_backend(DEFAULT_BACKEND, pipeline.model).collect(list(sites.values()), batch.model_inputs())
    return {layer: states[site] for layer, site in sites.items()}


@dataclass
class TeacherForced:
    """Prompt + answer (+ EOS) in one left-padded batch. ``answer_columns[b]``: the columns whose *next-token*
    prediction is answer token i (the last prompt column first); ``answer_ids[b]``: those target ids."""

    batch: PromptBatch
    answer_columns: list[list[int]]
    answer_ids: list[list[int]]
    prompt_lengths: list[int]


def teacher_forced(pipeline: LMPipeline, prompts: Sequence[Any], answers: Sequence[str],
                   add_eos: bool = True) -> TeacherForced:
    """Tokenise prompt then answer separately (the answer as the model would generate it) and left-pad."""
    tok = pipeline.tokenizer
    rows, targets, plens = [], [], []
    for prompt, answer in zip(prompts, answers):
        ids = pipeline.tokenize_one(prompt)["input_ids"]
        ans = list(tok(answer, add_special_tokens=False)["input_ids"])
        if add_eos and tok.eos_token_id is not None:
            ans.append(tok.eos_token_id)
        rows.append(ids + ans)
        targets.append(ans)
        plens.append(len(ids))
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    device = pipeline.device
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    offsets = [width - len(r) for r in rows]
    batch = PromptBatch(input_ids, mask, position_ids, [len(r) for r in rows], offsets)
    columns = [[offsets[b] + plens[b] - 1 + i for i in range(len(targets[b]))] for b in range(len(rows))]
    return TeacherForced(batch, columns, targets, plens)


@torch.no_grad()
def answer_logprob(pipeline: LMPipeline, forced: TeacherForced) -> torch.Tensor:
    """(B,) summed log-probability of each row's answer tokens under the model (as it runs now: hooks apply)."""
    logits = pipeline.model(**forced.batch.model_inputs(), use_cache=False).logits.float()
    logp = logits.log_softmax(-1)
    out = torch.zeros(len(forced.answer_ids))
    for b, (cols, ids) in enumerate(zip(forced.answer_columns, forced.answer_ids)):
        out[b] = logp[b, cols, ids].sum().cpu()
    return out


def batches(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    """``(start, chunk)`` over ``items`` in chunks of ``size`` (size ≥ 1)."""
    if size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {size}")
    for start in range(0, len(items), size):
        yield start, items[start:start + size]
