"""Attribution patching (AtP) of residual-stream cells: every (layer, position) cell's interchange effect
estimated from one source pass, one base pass and one backward, checked against exact patching.

Metric (defined by a hypothesis's labels, multi-token answers scored whole, teacher-forced):
``M(x) = log p(cf_label | x) - log p(base_label | x)`` summed over each label's tokens, for the base prompt x.
The exact interchange effect of a cell is ``M(base with the cell patched from the source) - M(base)``; the
first-order estimate is ``(a_source - a_base) · dM/da`` at the base run, summed over the cell's token positions.
Pairs whose two labels are equal have M = 0 and effect 0.

Residual index r: the input of decoder layer r (r = 0: the embeddings' output, ``layer = -1``); ``layer = l``
is the output of layer l (r = l + 1), as `ResidualStream(l, …, "block_output")`.

Known failure modes of the linear estimate: a patch that moves the residual far (whole-vector patches of
input digits at the embeddings) leaves the region where the first-order term describes the change, and
attention saturation makes the softmax locally flat; the exact pass (`exact_effects`) is the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from experiments.architectures import family_of, get_module
from experiments.hooks_backend import register_site_hook
from experiments.pipeline import LMPipeline
from experiments.token_positions import TokenPosition


@dataclass(frozen=True)
class ResidualCell:
    """One residual-stream cell: the output of ``layer`` (-1: embeddings) at the tokens of ``position``."""

    layer: int
    position: TokenPosition

    @property
    def cell_id(self) -> str:
        return f"L{self.layer}@{self.position.id}"


@dataclass
class AttributionResult:
    """Per (cell, pair): ``estimates`` (C, N) first-order effects on the metric; ``exact`` (C, N) when computed;
    ``metric_base`` (N,) the unpatched metric. ``informative`` (N,) marks pairs whose two labels differ."""

    cell_ids: list[str]
    estimates: np.ndarray
    metric_base: np.ndarray
    informative: np.ndarray
    exact: np.ndarray | None = None


class ResidualAttribution:
    """AtP estimates and exact effects for residual-stream cells of one pipeline (plain torch hooks)."""

    def __init__(self, pipeline: LMPipeline, cells: Sequence[ResidualCell]):
        self.pipeline = pipeline
        self.cells = list(cells)
        model = pipeline.model
        self.layers = get_module(model, family_of(model).layers)
        self.n_layers = len(self.layers)
        for cell in self.cells:
            if not -1 <= cell.layer < self.n_layers:
                raise ValueError(f"cell {cell.cell_id}: layer {cell.layer} out of range -1..{self.n_layers - 1}")

    # ------------------------------------------------------------------ inputs
    def answer_ids(self, label: Any) -> list[int]:
        ids = self.pipeline.tokenizer(str(label), add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"label {label!r} has no tokens")
        return list(ids)

    def teacher_forced_inputs(self, prompts: Sequence[dict[str, Any]], answers: Sequence[list[int]]
                   ) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
        """Left-padded prompt + answer sequences; per row the column of prompt token 0 and the answer length."""
        rows = [list(self.pipeline.tokenize_one(p)["input_ids"]) + a for p, a in zip(prompts, answers)]
        width = max(map(len, rows))
        pad = self.pipeline.tokenizer.pad_token_id
        device = self.pipeline.device
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            ids[b, width - len(row):] = torch.tensor(row, device=device)
            mask[b, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        starts = [width - len(row) for row in rows]
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}, starts, [len(a) for a in answers]

    def residual_hooks(self, store: list[torch.Tensor | None], leaf: bool,
               patch: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> list[Any]:
        """Keep the residual entering every layer and the last layer's output in ``store`` (index r); with
        ``leaf`` the embeddings' output becomes a leaf that requires grad and every state keeps its grad;
        ``patch = (r, rows, cols, values)`` writes ``values`` into residual r first."""

        def keeper(r: int):
            def keep(t: torch.Tensor) -> torch.Tensor | None:
                new = None
                if patch is not None and patch[0] == r:
                    new = t.clone()
                    new[patch[1], patch[2]] = patch[3].to(t.dtype)
                    t = new
                if leaf and r == 0:
                    t = t.detach().requires_grad_(True)
                    new = t
                elif leaf:
                    t.retain_grad()
                store[r] = t
                return new
            return keep

        handles = [register_site_hook(self.layers[0], "input", keeper(0))]
        handles += [register_site_hook(layer, "output", keeper(j + 1)) for j, layer in enumerate(self.layers)]
        return handles

    def answer_logprob(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        """(B,) summed log-probabilities of each row's last ``lengths[b]`` tokens (teacher-forced)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = []
        width = logits.shape[1]
        for b, n in enumerate(lengths):
            cols = torch.arange(width - n, width, device=logits.device)
            out.append(logp[b, cols - 1, inputs["input_ids"][b, cols]].sum())
        return torch.stack(out)

    def residual_states(self, prompts: Sequence[dict[str, Any]]) -> tuple[list[torch.Tensor], list[int]]:
        """The residual entering every layer and the last layer's output, (B, T, d) each (index r), of a
        left-padded batch of ``prompts``, with each row's pad offset (column of its token 0)."""
        store: list[torch.Tensor | None] = [None] * (self.n_layers + 1)
        batch = self.pipeline.load(prompts)
        handles = self.residual_hooks(store, leaf=False)
        try:
            with torch.no_grad():
                self.pipeline.model.base_model(**batch.model_inputs(), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return [t.detach() for t in store], list(batch.pad_offsets)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ estimates
    def estimate(self, bases: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]],
                 base_labels: Sequence[Any], cf_labels: Sequence[Any], exact: bool = False) -> AttributionResult:
        """AtP estimates (and, with ``exact``, exact effects) of every cell on the pairs (base i, source i)."""
        n = len(bases)
        if not (len(sources) == len(base_labels) == len(cf_labels) == n):
            raise ValueError("bases, sources and both label lists must have the same length")
        model = self.pipeline.model
        src, src_offsets = self.residual_states(sources)
        answers_cf = [self.answer_ids(label) for label in cf_labels]
        answers_base = [self.answer_ids(label) for label in base_labels]
        informative = np.array([str(a) != str(b) for a, b in zip(cf_labels, base_labels)])
        grads, acts, starts, metric = [], None, [], torch.zeros(n)
        for sign, answers in ((1.0, answers_cf), (-1.0, answers_base)):
            store: list[torch.Tensor | None] = [None] * (self.n_layers + 1)
            inputs, row_starts, lengths = self.teacher_forced_inputs(bases, answers)
            handles = self.residual_hooks(store, leaf=True)
            try:
                with torch.enable_grad():
                    logits = model(**inputs, use_cache=False).logits
                    lp = self.answer_logprob(logits, inputs, lengths)
                    (sign * lp).sum().backward()
            finally:
                for h in handles:
                    h.remove()
            metric += sign * lp.detach().cpu()
            grads.append([t.grad.detach() for t in store])  # type: ignore[union-attr]
            starts.append(row_starts)
            if acts is None:
                acts = [t.detach() for t in store]  # type: ignore[union-attr]
                act_starts = row_starts
        estimates = np.zeros((len(self.cells), n))
        for c, cell in enumerate(self.cells):
            r = cell.layer + 1
            for i in range(n):
                base_idx = cell.position.index(bases[i])
                src_idx = cell.position.counterfactual_index(sources[i])
                if len(base_idx) != len(src_idx):
                    raise ValueError(f"cell {cell.cell_id}: {len(base_idx)} base tokens but {len(src_idx)} source tokens")
                delta = (src[r][i, [src_offsets[i] + j for j in src_idx]]
                         - acts[r][i, [act_starts[i] + j for j in base_idx]])
                g = (grads[0][r][i, [starts[0][i] + j for j in base_idx]]
                     + grads[1][r][i, [starts[1][i] + j for j in base_idx]])
                estimates[c, i] = float((delta.float() * g.float()).sum())
        estimates[:, ~informative] = 0.0
        result = AttributionResult([cell.cell_id for cell in self.cells], estimates, metric.numpy(), informative)
        if exact:
            result.exact = self.exact_effects(bases, sources, answers_base, answers_cf, src, src_offsets,
                                              metric.numpy(), informative)
        return result

    def exact(self, bases: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]], base_labels: Sequence[Any],
              cf_labels: Sequence[Any], estimated: AttributionResult) -> np.ndarray:
        """(C, N) exact effects of the cells on the pairs of an earlier `estimate` (its base metric reused)."""
        src, src_offsets = self.residual_states(sources)
        return self.exact_effects(bases, sources, [self.answer_ids(x) for x in base_labels],
                                  [self.answer_ids(x) for x in cf_labels], src, src_offsets,
                                  estimated.metric_base, estimated.informative)

    @torch.no_grad()
    def exact_effects(self, bases: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]],
                      answers_base: list[list[int]], answers_cf: list[list[int]], src: list[torch.Tensor],
                      src_offsets: list[int], metric_base: np.ndarray, informative: np.ndarray) -> np.ndarray:
        """(C, N) exact effects on the metric: the same teacher-forced passes with the cell patched."""
        model = self.pipeline.model
        out = np.zeros((len(self.cells), len(bases)))
        for c, cell in enumerate(self.cells):
            r = cell.layer + 1
            metric = torch.zeros(len(bases))
            for sign, answers in ((1.0, answers_cf), (-1.0, answers_base)):
                inputs, row_starts, lengths = self.teacher_forced_inputs(bases, answers)
                rows, cols, values = [], [], []
                for i in range(len(bases)):
                    base_idx = cell.position.index(bases[i])
                    src_idx = cell.position.counterfactual_index(sources[i])
                    rows += [i] * len(base_idx)
                    cols += [row_starts[i] + j for j in base_idx]
                    values.append(src[r][i, [src_offsets[i] + j for j in src_idx]])
                device = inputs["input_ids"].device
                patch = (r, torch.tensor(rows, device=device), torch.tensor(cols, device=device), torch.cat(values))
                store: list[torch.Tensor | None] = [None] * (self.n_layers + 1)
                handles = self.residual_hooks(store, leaf=False, patch=patch)
                try:
                    logits = model(**inputs, use_cache=False).logits
                finally:
                    for h in handles:
                        h.remove()
                metric += sign * self.answer_logprob(logits, inputs, lengths).cpu()
            out[c] = metric.numpy() - metric_base
        out[:, ~informative] = 0.0
        return out
