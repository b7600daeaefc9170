"""Projecting only the read position equals the model's own logits, on every family."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FAMILIES

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

PROMPTS = ["12+3=", "7+45=", "1+1="]


@pytest.mark.parametrize("family", FAMILIES)
def test_projected_last_logits_equal_model_logits(family, pipelines):
    pipe = pipelines[family]
    assert pipe.projects_last_only
    if family == "gemma2":
        assert pipe.config.final_logit_softcapping is not None
    batch = pipe.load(PROMPTS)
    with torch.no_grad():
        expected = pipe.model(**batch.model_inputs()).logits[:, -1].float()
        hidden = pipe.body(**batch.model_inputs()).last_hidden_state
        got = pipe.project(hidden[:, -1])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generation_same_with_and_without_projection_shortcut(family, pipelines):
    pipe = pipelines[family]
    batch = pipe.load(PROMPTS)
    fast = pipe.generate(batch)
    pipe.projects_last_only = False
    try:
        slow = pipe.generate(batch)
    finally:
        pipe.projects_last_only = True
    assert torch.equal(fast.token_ids, slow.token_ids)
    torch.testing.assert_close(fast.topk_logits, slow.topk_logits, atol=1e-5, rtol=1e-5)


def test_other_logit_transform_falls_back_to_model_forward(pipelines):
    from experiments.pipeline import LMPipeline

    pipe = pipelines["llama"]
    pipe.config.logit_scale = 0.5
    try:
        scaled = LMPipeline(pipe.model, tokenizer=pipe.tokenizer, device="cpu")
        assert not scaled.projects_last_only and scaled.body is scaled.model
    finally:
        del pipe.config.logit_scale
