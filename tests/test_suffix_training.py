"""Training through the suffix is exact: the suffix's answer logits equal the full teacher-forced forward with a
hook patch (single and joint columns, per-row columns under left padding, every residual index from the
embeddings to the last layer's output) on the addition organism and on tiny random GPT-2, Llama, Gemma 2, OLMo 2
and Qwen 2 models; gradients reach the values only; DAS through the suffix gives the losses of DAS through the full
forward; an unsupported setting falls back to the full forward and says so."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, _single_thread
from experiments.attribution import ResidualAttribution, ResidualCell
from experiments.featurizers.learned import OrthogonalSubspace
from experiments.pipeline import LMPipeline
from experiments.featurizers.learned import LowRankSubspace
from experiments.featurizers.das import JointResidualCell, ResidualDAS
from experiments.featurizers.suffix_training import SuffixForward, TeacherForcedBase
from experiments.backends.sites import SiteEdit
from experiments.backends.suffix_reuse import residual_site

PROMPTS = [{"raw_input": s} for s in ("12+34=", "5+6=", "77+8=", "40+41=", "3+90=", "66+6=")]
LABELS = ["46", "11", "85", "81", "93", "72"]


@pytest.fixture(scope="module")
def organism() -> LMPipeline:
    from tasks.general_addition.organism import ORGANISM_DIR

    _single_thread()
    return LMPipeline(str(ORGANISM_DIR), device="cpu")


def teacher_forced(pipeline, prompts=PROMPTS, labels=LABELS):
    access = ResidualAttribution(pipeline, [])
    inputs, starts, lengths = access.teacher_forced_inputs(prompts, [access.answer_ids(x) for x in labels])
    return access, inputs, starts, lengths


def hooked_reference(pipeline, access, inputs, lengths, r, columns, values):
    """Answer-predicting logits of the full teacher-forced forward with ``values`` written into residual r."""
    n, m = columns.shape
    rows, cols = torch.arange(n).repeat_interleave(m), columns.flatten()

    def write(t):
        t = t.clone()
        t[rows, cols] = values.flatten(0, 1).to(t.dtype)
        return t

    with torch.no_grad(), access.backend.edits([SiteEdit(residual_site(r), write)]):
        logits = pipeline.model(**inputs, use_cache=False).logits.float()
    width, M = inputs["input_ids"].shape[1], max(lengths)
    return logits[:, width - 1 - M: width - 1]


def column_sets(starts, prompt_lengths):
    """Per-row padded columns: one token (the first digit, the last prompt token) and joint pairs/triples."""
    first = [[s + 1] for s in starts]
    last = [[s + n - 1] for s, n in zip(starts, prompt_lengths)]
    pair = [[s + 1, s + n - 2] for s, n in zip(starts, prompt_lengths)]
    triple = [[s + n - 1, s + 2, s] for s, n in zip(starts, prompt_lengths)]  # unsorted, includes BOS
    return {"first": first, "last": last, "pair": pair, "triple": triple}


def check_against_reference(pipeline, residuals):
    access, inputs, starts, lengths = teacher_forced(pipeline)
    prompt_lengths = [len(pipeline.tokenize_one(p)["input_ids"]) for p in PROMPTS]
    base = TeacherForcedBase.run(pipeline, inputs, lengths)
    assert base.unsupported is None
    g = torch.Generator().manual_seed(0)
    moved = 0.0
    for r in residuals:
        for name, cols in column_sets(starts, prompt_lengths).items():
            forward = SuffixForward(base, r, cols)
            assert forward.mode == "suffix"
            columns = torch.tensor(cols)
            scale = base.residual[r].std()
            values = torch.randn(len(PROMPTS), columns.shape[1], base.residual[r].shape[-1], generator=g) * scale
            rows = torch.arange(len(PROMPTS))
            with torch.no_grad():
                got = forward.logits(rows, values)
                part = forward.logits(rows[3:], values[3:].flatten(1))  # a subset of rows, values as (B, m·d)
            expected = hooked_reference(pipeline, access, inputs, lengths, r, columns, values)
            tolerance = 1e-5 * max(1.0, float(expected.abs().max()))
            torch.testing.assert_close(got, expected, atol=tolerance, rtol=0, msg=f"r={r} {name}")
            torch.testing.assert_close(part, expected[3:], atol=tolerance, rtol=0, msg=f"r={r} {name} subset")
            torch.testing.assert_close(forward.unpatched_logits(), hooked_reference(
                pipeline, access, inputs, lengths, r, columns, forward.base_values()), atol=tolerance, rtol=0)
            moved = max(moved, float((expected - forward.unpatched_logits()).abs().max()))
    assert moved > 1.0, "the patches must move the answer logits for the comparison to bite"


def test_suffix_logits_equal_the_hooked_full_forward_on_the_organism(organism):
    check_against_reference(organism, [0, 1, 2, 3, 4])


@pytest.mark.parametrize("family", FAMILIES)  # GPT-2, Llama with GQA, Gemma 2 (softcapping), OLMo 2, Qwen 2
def test_suffix_logits_equal_the_hooked_full_forward_on_other_architectures(family, pipelines):
    pipeline = pipelines[family]
    check_against_reference(pipeline, list(range(pipeline.num_layers + 1)))


def test_gradients_reach_only_the_values(organism):
    _, inputs, starts, lengths = teacher_forced(organism)
    base = TeacherForcedBase.run(organism, inputs, lengths)
    for r in (0, 2, 4):
        forward = SuffixForward(base, r, [[s + 1, s + 2] for s in starts])  # before every answer-predicting column
        values = (forward.base_values() + 0.1).requires_grad_(True)
        loss = -forward.answer_logprob(torch.arange(len(PROMPTS)), values).mean()
        loss.backward()
        moved = float(values.grad.abs().max())
        # the last layer's output at columns that predict no answer token cannot reach the loss
        assert moved > 0 if r < 4 else moved == 0
        assert all(p.grad is None and not p.requires_grad for p in organism.model.parameters())
        for t in [*base.residual, *base.keys, *base.values]:
            assert not t.requires_grad


def test_answer_logprob_is_attributions_metric(organism):
    access, inputs, starts, lengths = teacher_forced(organism)
    forward = SuffixForward(TeacherForcedBase.run(organism, inputs, lengths), 2, [[s + 3] for s in starts])
    with torch.no_grad():
        logits = organism.model(**inputs, use_cache=False).logits
        expected = access.answer_logprob(logits, inputs, lengths)
        got = forward.answer_logprob(torch.arange(len(PROMPTS)), forward.base_values())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def organism_das(organism, force_full: bool) -> ResidualDAS:
    from tasks.general_addition.task import TASK, AdditionSettings

    settings = AdditionSettings()
    data = TASK.make_datasets(settings, ["random"], 48, 0)["random"]
    labels = TASK.main_model(settings).label_counterfactual_data(data, ["carry_0"])
    examples = data.to_list()
    return ResidualDAS(organism, [e["input"] for e in examples], [e["counterfactual_inputs"][0] for e in examples],
                       labels, force_full_forward=force_full)


def das_cells(pipeline):
    from tasks.general_addition.task import TASK, AdditionSettings

    positions = {p.id: p for p in TASK.token_positions(pipeline, AdditionSettings())}
    return [ResidualCell(-1, positions["digit_0_1"]), ResidualCell(1, positions["digit_1_0"]),
            JointResidualCell(2, (positions["digit_0_0"], positions["digit_1_0"]))]


def test_das_through_the_suffix_trains_as_through_the_full_forward(organism):
    """k = 1 in float32: a k-dimensional basis (k >= 2) can turn inside its own span without changing the loss,
    whose gradient is rounding noise that Adam's sign-like first steps amplify to lr; see the float64 test."""
    fast, slow = organism_das(organism, False), organism_das(organism, True)
    for cell in das_cells(organism):
        width = 128 * (2 if isinstance(cell, JointResidualCell) else 1)
        a = fast.fit(cell, k=1, steps=4, module=LowRankSubspace(width, 1))
        b = slow.fit(cell, k=1, steps=4, module=LowRankSubspace(width, 1))
        assert (a.forward_mode, b.forward_mode) == ("suffix", "full")
        assert max(abs(x - y) for x, y in zip(a.losses, b.losses)) < 1e-5, (cell.cell_id, a.losses, b.losses)
        assert a.losses[0] != a.losses[-1], "the subspace must move"
        torch.testing.assert_close(a.featurizer.basis, b.featurizer.basis, atol=1e-5, rtol=0)
        assert (a.das, a.full_vector, a.untrained) == (b.das, b.full_vector, b.untrained)
    joint = fast.fit(das_cells(organism)[2], k=3, steps=1, orthogonal_map="cayley")
    assert joint.cell_id == "L2@digit_0_0+digit_1_0" and joint.featurizer.basis.shape == (2 * 128, 3)


def test_das_with_a_full_rotation_in_float64_trains_as_through_the_full_forward():
    from tasks.general_addition.organism import ORGANISM_DIR

    organism64 = LMPipeline(str(ORGANISM_DIR), device="cpu", dtype=torch.float64)
    fast, slow = organism_das(organism64, False), organism_das(organism64, True)
    for cell in das_cells(organism64)[1:]:
        a, b = (das.fit(cell, k=2, steps=3) for das in (fast, slow))  # the default: a (m·d)² matrix_exp rotation
        assert (a.forward_mode, b.forward_mode) == ("suffix", "full")
        assert max(abs(x - y) for x, y in zip(a.losses, b.losses)) < 1e-9, (cell.cell_id, a.losses, b.losses)


def test_fit_takes_a_trainable_module_with_penalty_and_schedule(organism):
    from tasks.general_addition.task import TASK, AdditionSettings

    position = {p.id: p for p in TASK.token_positions(organism, AdditionSettings())}["digit_1_0"]
    das = organism_das(organism, False)

    class Scheduled(OrthogonalSubspace):
        def __init__(self):
            super().__init__(128, 2, "cayley", seed=das.seed)
            self.progress = []

        def set_progress(self, fraction):
            self.progress.append(fraction)

        def penalty(self):
            return torch.tensor(0.5)

    module = Scheduled()
    result = das.fit(ResidualCell(1, position), steps=3, module=module)
    plain = das.fit(ResidualCell(1, position), steps=3, orthogonal_map="cayley")
    assert module.progress == [0.0, 0.5, 1.0]
    assert abs(result.losses[0] - plain.losses[0] - 0.5) < 1e-6
    assert result.featurizer.basis.shape == (128, 2) and result.k == 2


def test_an_unsupported_setting_falls_back_to_the_full_forward(model_dirs):
    """GPT-2's reordered eager attention bypasses the attention registry: the suffix path declines, the full
    hooked forward runs instead, explicitly, with the same outputs."""
    pipeline = LMPipeline(str(model_dirs["gpt2"]), device="cpu")
    pipeline.model.set_attn_implementation("eager")
    pipeline.config.reorder_and_upcast_attn = True
    access, inputs, starts, lengths = teacher_forced(pipeline)
    base = TeacherForcedBase.run(pipeline, inputs, lengths)
    assert "bypasses the attention registry" in base.unsupported
    columns = torch.tensor([[s + 1, s + 3] for s in starts])
    forward = SuffixForward(base, 1, columns)
    assert forward.mode == "full" and forward.reason == base.unsupported
    values = forward.base_values() * 1.5
    expected = hooked_reference(pipeline, access, inputs, lengths, 1, columns, values)
    torch.testing.assert_close(forward.logits(torch.arange(len(PROMPTS)), values), expected, atol=1e-5, rtol=0)


def test_bad_columns_are_refused(organism):
    _, inputs, starts, lengths = teacher_forced(organism)
    base = TeacherForcedBase.run(organism, inputs, lengths)
    width = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="before the last answer token"):
        SuffixForward(base, 1, [[width - 1]] * len(PROMPTS))
    with pytest.raises(ValueError, match="distinct"):
        SuffixForward(base, 1, [[s + 1, s + 1] for s in starts])
    with pytest.raises(ValueError, match="out of range"):
        SuffixForward(base, 5, [[s + 1] for s in starts])
