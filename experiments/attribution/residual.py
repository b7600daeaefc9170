"""Attribution patching (AtP) of residual-stream cells: every (layer, position) cell's interchange effect
estimated from one source pass and one base forward/backward, checked against exact patching. The general
machinery (attention, MLP, head and attention-pattern units; the AtP* corrections) is
`experiments.attribution.units`; screening then verifying is `experiments.attribution.screen`.

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

from experiments.attribution.units import (
    AttributionCell,
    AttributionResult,
    PreparedPairs,
    TeacherForcedMetric,
    UnitAttribution,
)
from experiments.backends.sites import Site
from experiments.backends.suffix_reuse import residual_site
from experiments.pipeline import LMPipeline
from experiments.token_positions import TokenPosition

__all__ = ["AttributionCell", "AttributionResult", "ResidualAttribution", "ResidualCell", "TeacherForcedMetric",
           "UnitAttribution"]


@dataclass(frozen=True)
class ResidualCell:
    """One residual-stream cell: the output of ``layer`` (-1: embeddings) at the tokens of ``position``."""

    layer: int
    position: TokenPosition

    @property
    def cell_id(self) -> str:
        return f"L{self.layer}@{self.position.id}"


class ResidualAttribution(UnitAttribution):
    """AtP estimates and exact effects for residual-stream cells of one pipeline: the residual cells of
    `UnitAttribution`, plus every residual state of a run (``residual_states``) for code that trains at residual
    cells."""

    def __init__(self, pipeline: LMPipeline, cells: Sequence[ResidualCell]):
        n_layers = pipeline.num_layers
        for cell in cells:
            if not -1 <= cell.layer < n_layers:
                raise ValueError(f"cell {cell.cell_id}: layer {cell.layer} out of range -1..{n_layers - 1}")
        self.residual_cells = list(cells)
        super().__init__(pipeline, [AttributionCell("residual", c.layer, c.position) for c in cells])

    def residual_states(self, prompts: Sequence[dict[str, Any]]) -> tuple[list[torch.Tensor], list[int]]:
        """The residual entering every layer and the last layer's output, (B, T, d) each (index r), of a
        left-padded batch of ``prompts``, with each row's pad offset (column of its token 0)."""
        batch = self.pipeline.load(prompts)
        sites = [residual_site(r) for r in range(self.n_layers + 1)]
        states = self.backend.collect(sites, batch.model_inputs())
        return [states[site] for site in sites], list(batch.pad_offsets)

    @torch.no_grad()
    def exact_effects(self, bases: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]],
                      answers_base: list[list[int]], answers_cf: list[list[int]], src: list[torch.Tensor],
                      src_offsets: list[int], metric_base: np.ndarray, informative: np.ndarray) -> np.ndarray:
        """(C, N) exact effects on the metric of patching the residual states ``src`` (index r, as
        `residual_states`; row i read at ``src_offsets[i]`` + the source's token indices) into the same
        teacher-forced passes."""
        inputs, starts, lengths = self.teacher_forced_inputs(list(bases) * 2, list(answers_cf) + list(answers_base))
        pairs = PreparedPairs(list(bases), list(sources), inputs, starts, lengths, np.asarray(informative, dtype=bool),
                              {residual_site(r): t for r, t in enumerate(src)}, {}, list(src_offsets),
                              [int(src[0].shape[1]) - o for o in src_offsets])
        return self.exact_prepared(pairs, np.asarray(metric_base))
