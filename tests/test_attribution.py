"""Attribution patching of residual cells: zero where the source equals the base, the first-order term
equal to the exact effect's slope for a vanishing patch, and the exact pass equal to the engine's patching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.attribution import ResidualAttribution, ResidualCell
from experiments.token_positions import TokenPosition

BASES = [{"raw_input": s} for s in ("12+34=", "5+6=", "123+45=")]
SOURCES = [{"raw_input": s} for s in ("98+76=", "7+1=", "300+99=")]
BASE_LABELS = ["46", "11", "168"]
CF_LABELS = ["174", "8", "399"]


def cells(pipeline):
    last = TokenPosition(lambda s: [-1], pipeline, id="last")
    op = TokenPosition(lambda s: [-3], pipeline, id="m3")
    return [ResidualCell(layer, p) for layer in range(-1, pipeline.num_layers) for p in (last, op)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_source_equal_to_the_base_has_no_effect(family, pipelines):
    pipeline = pipelines[family]
    result = ResidualAttribution(pipeline, cells(pipeline)).estimate(BASES, BASES, BASE_LABELS, CF_LABELS, exact=True)
    # (the source pass pads differently from the teacher-forced one: float noise only)
    assert np.abs(result.estimates).max() < 1e-4 and np.abs(result.exact).max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_estimate_is_the_slope_of_the_exact_effect(family, pipelines):
    """For a patch a_base + t (a_source - a_base), (exact effect)/t -> the estimate as t -> 0."""
    pipeline = pipelines[family]
    chosen = cells(pipeline)
    att = ResidualAttribution(pipeline, chosen)
    result = att.estimate(BASES, SOURCES, BASE_LABELS, CF_LABELS, exact=True)
    assert np.abs(result.exact).max() > 1e-3, "the patches must move the metric"
    src, src_offsets = att.residual_states(SOURCES)
    t = 1e-3
    answers_cf = [att.answer_ids(x) for x in CF_LABELS]
    answers_base = [att.answer_ids(x) for x in BASE_LABELS]
    base_states, base_offsets = att.residual_states(BASES)  # the base prompts' own residual states
    # rebuild source states on the base layout: a_base + t (a_src - a_base) at every cell's tokens
    for c, cell in enumerate(chosen):
        r = cell.layer + 1
        nudged = [s.clone() for s in src]
        for i in range(len(BASES)):
            bi = [base_offsets[i] + j for j in cell.position.index(BASES[i])]
            si = [src_offsets[i] + j for j in cell.position.counterfactual_index(SOURCES[i])]
            nudged[r][i, si] = base_states[r][i, bi] + t * (src[r][i, si] - base_states[r][i, bi])
        single = ResidualAttribution(pipeline, [cell])
        slope = single.exact_effects(BASES, SOURCES, answers_base, answers_cf, nudged, src_offsets,
                                     result.metric_base, result.informative)[0] / t
        np.testing.assert_allclose(slope, result.estimates[c], rtol=0.05, atol=0.05)
