"""Training at attention-output, MLP-output and head units: the differentiable full forward (`SiteForward`)
equals an independent hand-written hook patch on a tiny Llama, an identity patch leaves every architecture's
answer logits unchanged, an MLP-output patch equals the same change added to the residual stream after its
layer (the suffix path), gradients reach the values only, and DAS at an MLP unit of the planted organism finds
carry_0 where the planted subspace gets it."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES
from experiments.attribution import ResidualAttribution
from experiments.backends import backend_with
from experiments.featurizers.training import LabelledPairs, TrainingSettings, train_featurizer
from experiments.featurizers.das import ResidualDAS, UnitCell
from experiments.backends.sites import Site
from experiments.featurizers.suffix_training import SiteForward, SuffixForward, TeacherForcedBase
from experiments.token_positions import TokenPosition

PROMPTS = [{"raw_input": s} for s in ("12+34=", "5+6=", "77+8=", "40+41=")]
LABELS = ["46", "11", "85", "81"]
COMPONENTS = ["attention_output", "mlp_output", "head_attention_value_output"]


def _base(pipeline):
    access = ResidualAttribution(pipeline, [])
    inputs, starts, lengths = access.teacher_forced_inputs(PROMPTS, [access.answer_ids(x) for x in LABELS])
    return TeacherForcedBase.run(pipeline, inputs, lengths), starts


def _site_forward(pipeline, component, layer=1, head=None):
    base, starts = _base(pipeline)
    site = Site(layer, component)
    columns = torch.tensor([[s + 1, s + 2] for s in starts])  # two prompt tokens of every row (a joint unit)
    states = backend_with("gradients", pipeline.model).collect([site], base.inputs)[site]
    if head is not None:
        states = states[:, :, head]
    rows = torch.arange(len(PROMPTS))[:, None]
    return SiteForward(base, site, columns, states[rows, columns], head=head), base, columns


def _llama_module(model, component: str, layer: int):
    block = model.model.layers[layer]
    return {"attention_output": block.self_attn, "mlp_output": block.mlp,
            "head_attention_value_output": block.self_attn.o_proj}[component]


@pytest.mark.parametrize("component", COMPONENTS)
def test_site_forward_equals_a_hand_written_hook_patch(component, pipelines):
    pipeline = pipelines["llama"]
    head = 1 if component == "head_attention_value_output" else None
    forward, base, columns = _site_forward(pipeline, component, layer=0, head=head)
    values = torch.randn(*forward.base_values().shape, generator=torch.Generator().manual_seed(0))
    model = pipeline.model
    rows = torch.arange(len(PROMPTS))[:, None].expand_as(columns)

    def write(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if head is None:
            t[rows, columns] = values.to(t.dtype)
        else:
            d_head = values.shape[-1]
            view = t.view(*t.shape[:-1], -1, d_head)
            view[rows, columns, head] = values.to(t.dtype)
        return t

    module = _llama_module(model, component, 0)
    if head is None:
        handle = module.register_forward_hook(
            lambda _m, _a, out: (write(out[0]), *out[1:]) if isinstance(out, tuple) else write(out))
    else:
        handle = module.register_forward_pre_hook(lambda _m, args: (write(args[0]), *args[1:]))
    try:
        with torch.no_grad():
            logits = model(**base.inputs, use_cache=False).logits.float()
    finally:
        handle.remove()
    width, M = base.width, forward.n_slots
    with torch.no_grad():
        got = forward.logits(torch.arange(len(PROMPTS)), values)
    torch.testing.assert_close(got, logits[:, width - 1 - M: width - 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, forward.unpatched_logits(), atol=1e-3), "the patch moved the answer logits"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("component", COMPONENTS)
def test_an_identity_patch_changes_nothing_and_gradients_reach_the_values_only(family, component, pipelines):
    pipeline = pipelines[family]
    head = 0 if component == "head_attention_value_output" else None
    forward, _, _ = _site_forward(pipeline, component, layer=0, head=head)
    rows = torch.arange(len(PROMPTS))
    with torch.no_grad():
        same = forward.logits(rows, forward.base_values())
    torch.testing.assert_close(same, forward.unpatched_logits(), atol=1e-4, rtol=1e-4)
    values = (forward.base_values() + 0.1).requires_grad_(True)
    forward.answer_logprob(rows, values).sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipeline.model.parameters()), "the network gets no gradient"


def test_an_mlp_output_patch_equals_the_same_change_in_the_residual_after_its_layer(pipelines):
    pipeline = pipelines["llama"]
    forward, base, columns = _site_forward(pipeline, "mlp_output", layer=0)
    delta = torch.randn(*forward.base_values().shape, generator=torch.Generator().manual_seed(1))
    residual = SuffixForward(base, 1, columns)  # residual entering layer 1 = layer 0's output
    rows = torch.arange(len(PROMPTS))
    with torch.no_grad():
        through_mlp = forward.logits(rows, forward.base_values() + delta)
        through_residual = residual.logits(rows, residual.base_values() + delta)
    torch.testing.assert_close(through_mlp, through_residual, atol=1e-4, rtol=1e-4)


def test_unit_cells_name_the_sweep_cells_and_refuse_what_does_not_exist(pipelines):
    pipeline = pipelines["llama"]
    last = TokenPosition(lambda s: [-1], pipeline, id="last")
    first = TokenPosition(lambda s: [1], pipeline, id="first")
    assert UnitCell(1, (last,), "mlp_output").cell_id == "L1@last"
    assert UnitCell(0, (first, last), "head_attention_value_output", head=2).cell_id == "L0H2@first+last"
    with pytest.raises(ValueError, match="head index"):
        UnitCell(0, (last,), "head_attention_value_output")
    with pytest.raises(ValueError, match="embeddings"):
        UnitCell(-1, (last,), "mlp_output")
    with pytest.raises(ValueError, match="cannot train"):
        UnitCell(0, (last,), "attention_pattern")
    das = ResidualDAS(pipeline, PROMPTS, PROMPTS, LABELS, test_fraction=0.5)
    with pytest.raises(ValueError, match="head 99 out of range"):
        das.prepare(UnitCell(0, (last,), "head_attention_value_output", head=99))


def test_das_at_an_mlp_unit_of_the_planted_organism_finds_carry_0(tmp_path):
    from experiments.featurizers.store import FeaturizerLoadError, load_featurizers

    from experiments.pipeline import LMPipeline
    from tasks.general_addition.organism import PLANTED_ROTATED_DIR, load_planted_spec
    from tasks.general_addition.task import TASK, AdditionSettings

    pipeline = LMPipeline(str(PLANTED_ROTATED_DIR), device="cpu")
    spec = load_planted_spec(PLANTED_ROTATED_DIR)
    settings = AdditionSettings()
    pairs = LabelledPairs.from_datasets(TASK.make_datasets(settings, ["random", "flip_carry_0"], 64, 3),
                                        TASK.main_model(settings), "carry_0")
    position = {p.id: p for p in TASK.token_positions(pipeline, settings)}[spec.position]
    # the planted layer's MLP writes carry_0 at the planted position (its output reaches the planted subspace)
    result = train_featurizer(pipeline, pairs, UnitCell(spec.layer, (position,), "mlp_output"),
                              TrainingSettings(k=1, steps=150, eval_every=25, controls=("untrained",)), progress=False)
    assert result.forward_mode == "full"
    assert result.found and result.test.iia > 0.8, (result.test, result.reason)
    assert result.full_vector.iia < 0.5
    result.save(tmp_path / "mlp" / result.cell_id)
    assert set(load_featurizers(tmp_path / "mlp", component="mlp_output")) == {f"L{spec.layer}@{spec.position}"}
    with pytest.raises(FeaturizerLoadError, match="trained at mlp_output"):
        load_featurizers(tmp_path / "mlp", component="block_output")
