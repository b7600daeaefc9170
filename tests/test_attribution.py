"""Attribution patching: zero where the source equals the base; the first-order term equal to the exact effect's
slope for a vanishing patch (every activation unit kind); estimate == exact where the metric is linear in the unit
(AtP* for attention patterns); head estimates summing to the layer's; gradients only where needed; GradDrop; the
screen's selection and its verification; estimates kept apart from exact results."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from causal.results import RawResults, RawResultsWriter, ResultsError
from experiments.attribution import ResidualAttribution, ResidualCell
from experiments.attribution.screen import (
    SCORES,
    AttributionEstimates,
    ScreenConfig,
    estimate_study,
    pair_scores,
    screen_and_verify,
)
from experiments.attribution.units import AttributionCell, AttributionResult, UnitAttribution, sweep_cells
from experiments.pipeline import LMPipeline
from experiments.token_positions import TokenPosition

BASES = [{"raw_input": s} for s in ("12+34=", "5+6=", "123+45=")]
SOURCES = [{"raw_input": s} for s in ("98+76=", "7+1=", "300+99=")]
BASE_LABELS = ["46", "11", "168"]
CF_LABELS = ["174", "8", "399"]


def positions(pipeline):
    return [TokenPosition(lambda s: [-1], pipeline, id="last"), TokenPosition(lambda s: [-3], pipeline, id="m3")]


def cells(pipeline):
    return [ResidualCell(layer, p) for layer in range(-1, pipeline.num_layers) for p in positions(pipeline)]


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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_activation_kind_estimate_is_the_slope_of_its_exact_effect(family, pipelines):
    """Attention, MLP and head cells: the exact effect of a patch a_base + t (a_source - a_base), over t."""
    pipeline = pipelines[family]
    chosen = [c for c in sweep_cells(pipeline, positions(pipeline), kinds=("attention", "mlp", "head"))
              if c.kind != "head" or c.head in (0, 3)]
    att = UnitAttribution(pipeline, chosen)
    pairs = att.prepare(BASES, SOURCES, BASE_LABELS, CF_LABELS)
    result = att.estimate_prepared(pairs)
    assert np.abs(att.exact_prepared(pairs, result.metric_base)).max() > 1e-3, "the patches must move the metric"
    own = att.prepare(BASES, BASES, BASE_LABELS, CF_LABELS)  # the base prompts' activations, on their own layout
    t = 1e-3
    for c, cell in enumerate(chosen):
        _, src_cols, mask = pairs.columns(cell.position)
        _, base_cols, _ = own.columns(cell.position)
        rows = pairs.pair_of_row[:, None].expand_as(src_cols)[mask]
        s, b = src_cols[mask], base_cols[mask]
        source, base = pairs.source_acts[cell.site], own.source_acts[cell.site]
        nudged = source.clone()
        nudged[rows, s] = base[rows, b] + t * (source[rows, s] - base[rows, b])
        original = pairs.source_acts[cell.site]
        pairs.source_acts[cell.site] = nudged
        slope = att.exact_prepared(pairs, result.metric_base, [cell])[0] / t
        rows = att.exact_rows(pairs, [cell])
        toward = att.effects(pairs, rows, result.logp_cf, toward=True)[0] / t  # log p(cf label) alone
        pairs.source_acts[cell.site] = original
        np.testing.assert_allclose(slope, result.estimates[c], rtol=0.05, atol=0.05, err_msg=cell.cell_id)
        np.testing.assert_allclose(toward, result.toward[c], rtol=0.05, atol=0.05, err_msg=cell.cell_id)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_path_gradients_integrate_to_the_exact_effect(family, pipelines):
    """One cell per site: the path estimate is the integral of the gradient along base -> source, so it tends to
    the exact effect as the steps grow (midpoint rule), where the first-order estimate does not."""
    pipeline = pipelines[family]
    last = TokenPosition(lambda s: [-1], pipeline, id="last")
    m3 = TokenPosition(lambda s: [-3], pipeline, id="m3")
    chosen = ([AttributionCell("residual", layer, m3) for layer in range(-1, pipeline.num_layers)]
              + [AttributionCell("mlp", 0, last), AttributionCell("head", 1, m3, head=2)])
    att = UnitAttribution(pipeline, chosen)
    pairs = att.prepare(BASES, SOURCES, BASE_LABELS, CF_LABELS)
    plain = att.estimate_prepared(pairs)
    exact = att.exact_prepared(pairs, plain.metric_base)
    path = att.estimate_prepared(pairs, path_steps=48)
    assert np.abs(exact).max() > 0.1, "the patches must move the metric"
    first_order_error = np.abs(plain.estimates - exact).max()
    assert first_order_error > 1e-2, "the metric must be nonlinear in the cells for the check to bite"
    np.testing.assert_allclose(path.estimates, exact, rtol=0.02, atol=2e-3)
    np.testing.assert_array_equal(path.metric_base, plain.metric_base)
    with pytest.raises(ValueError, match="path_steps"):
        att.estimate_prepared(pairs, path_steps=-1)
    # GradDrop stays the plain estimate's, whatever path_steps says (also for layers below the gradient's leaf)
    high = UnitAttribution(pipeline, [AttributionCell("mlp", 1, last), AttributionCell("residual", 1, m3)])
    high_pairs = high.prepare(BASES, SOURCES, BASE_LABELS, CF_LABELS)
    dropped_plain = high.estimate_prepared(high_pairs, graddrop=True)
    dropped_path = high.estimate_prepared(high_pairs, graddrop=True, path_steps=2)
    assert not np.allclose(dropped_path.estimates, dropped_plain.estimates)
    np.testing.assert_allclose(dropped_path.graddrop, dropped_plain.graddrop, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="graddrop"):
        ScreenConfig(score="graddrop", path_steps=2)


@pytest.fixture(scope="module")
def linear_readout(char_tokenizer) -> LMPipeline:
    """A 2-layer Llama whose last layer reads out linearly after its attention: no final norm, no norm before
    the last MLP, the last MLP a linear map. With single-token labels M = logit(cf) - logit(base) is linear in
    every last-layer unit at the last position (and in the attention probabilities there)."""
    from conftest import make_model

    model = make_model("llama", len(char_tokenizer))
    last = model.model.layers[-1]
    torch.manual_seed(0)
    model.model.norm = torch.nn.Identity()
    last.post_attention_layernorm = torch.nn.Identity()
    last.mlp = torch.nn.Linear(64, 64, bias=False)
    return LMPipeline(model, tokenizer=char_tokenizer, device="cpu")


def test_estimate_equals_exact_where_the_metric_is_linear_in_the_unit(linear_readout):
    pipeline = linear_readout
    last = TokenPosition(lambda s: [-1], pipeline, id="last")
    chosen = sweep_cells(pipeline, [last], kinds=("residual", "attention", "mlp", "head", "pattern"), layers=[1])
    result = UnitAttribution(pipeline, chosen).estimate(BASES, SOURCES, ["4", "1", "8"], ["7", "8", "9"], exact=True)
    assert np.abs(result.exact).min() > 1e-3, "every patch must move the metric"
    np.testing.assert_allclose(result.estimates, result.exact, rtol=1e-4, atol=1e-4)
    pattern = np.array([c.kind == "pattern" for c in chosen])
    # the plain estimate, linearised through the softmax, is not exact there: that is what the QK fix fixes
    assert np.abs(result.linearised[pattern] - result.exact[pattern]).max() > 1e-2
    np.testing.assert_array_equal(result.linearised[~pattern], result.estimates[~pattern])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_estimates_sum_to_their_layers_attention_estimate(family, pipelines):
    pipeline = pipelines[family]
    chosen = sweep_cells(pipeline, positions(pipeline), kinds=("attention", "head"))
    result = UnitAttribution(pipeline, chosen).estimate(BASES, SOURCES, BASE_LABELS, CF_LABELS)
    ids = result.cell_ids
    for layer in range(pipeline.num_layers):
        for p in positions(pipeline):
            heads = sum(result.estimates[ids.index(f"L{layer}H{h}@{p.id}")] for h in range(pipeline.num_heads))
            np.testing.assert_allclose(heads, result.estimates[ids.index(f"L{layer}.attn@{p.id}")], atol=1e-4)


def test_gradients_reach_no_parameter_and_nothing_below_the_cells(char_tokenizer):
    from conftest import make_model

    model = make_model("llama", len(char_tokenizer))
    pipeline = LMPipeline(model, tokenizer=char_tokenizer, device="cpu")
    model.requires_grad_(True)  # as a model being trained would be
    seen: dict[str, list[bool]] = {"embeddings": [], "layer1": [], "params": []}

    def at_layer1(module, args, output) -> None:
        seen["layer1"].append(output.requires_grad)
        seen["params"].append(any(p.requires_grad for p in model.parameters()))

    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, a, o: seen["embeddings"].append(o.requires_grad)),
             model.model.layers[1].mlp.register_forward_hook(at_layer1)]
    try:
        chosen = sweep_cells(pipeline, positions(pipeline), kinds=("attention", "head", "pattern"), layers=[1])
        UnitAttribution(pipeline, chosen).estimate(BASES, SOURCES, BASE_LABELS, CF_LABELS, graddrop=True)
    finally:
        for h in hooks:
            h.remove()
    # forwards: the sources (no grad), the estimate, GradDrop of layer 1 (layer 0 lies below the cells: skipped)
    assert seen == {"embeddings": [False] * 3, "layer1": [False, True, False], "params": [False] * 3}
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_graddrop_drops_one_layer_at_a_time(pipelines):
    pipeline = pipelines["llama"]
    last = TokenPosition(lambda s: [-1], pipeline, id="last")
    m3 = TokenPosition(lambda s: [-3], pipeline, id="m3")
    chosen = [AttributionCell("residual", -1, m3), AttributionCell("mlp", 1, last), AttributionCell("head", 0, last, 2)]
    result = UnitAttribution(pipeline, chosen).estimate(BASES, SOURCES, BASE_LABELS, CF_LABELS, graddrop=True)
    assert result.graddrop.shape == (2, 3, 3)
    np.testing.assert_allclose(result.graddrop[0, 1], result.estimates[1], atol=1e-5)  # layer 0 lies upstream of L1.mlp
    assert np.abs(result.graddrop[1, 1]).max() == 0 and np.abs(result.graddrop[0, 2]).max() == 0  # their own layer
    assert np.abs(result.graddrop[:, 0] - result.estimates[0]).max() > 1e-4  # the embeddings' paths do change
    np.testing.assert_allclose(result.graddrop_score, np.abs(result.graddrop).sum(0) / 1)
    np.testing.assert_allclose(result.cancellation, np.abs(result.graddrop - result.estimates).max(0))


def synthetic_result(**arrays) -> AttributionResult:
    """Three cells, four pairs: the unpatched network prefers the base label on the first two, the cf label on
    the third; the last one's labels agree."""
    base = {"estimates": np.array([[1.0, 1.0, 1.0, 9.0], [-3.0, 0.5, -1.0, 0.0], [2.5, 0.2, 4.0, 0.0]]),
            "metric_base": np.log([0.1 / 0.8, 0.001 / 0.99, 0.5 / 0.3, 1.0]),
            "informative": np.array([True, True, True, False])}
    base["toward"] = base["estimates"] * 0.9
    base |= {"logp_cf": np.log([0.1, 0.001, 0.5, 0.5]), "logp_base": np.log([0.8, 0.99, 0.3, 0.5]),
             "greedy_cf": np.array([False, False, True, True]), "greedy_base": np.array([True, True, False, True])}
    return AttributionResult(["a", "b", "c"], **(base | arrays))


def test_ranking_scores_follow_their_definitions():
    r = synthetic_result()
    keep = r.informative
    est, toward, p = r.estimates[:, keep], r.toward[:, keep], np.exp(r.logp_cf[keep])
    means = {"abs": np.abs(est).mean(1), "signed": est.mean(1), "toward": toward.mean(1),
             "prob": (p * toward).mean(1), "informative": est[:, :2].mean(1)}  # pair 3's greedy answer is the label
    for score, expected in means.items():
        np.testing.assert_allclose(pair_scores(r, score)[0][:, pair_scores(r, score)[1]].mean(1), expected,
                                   err_msg=score)
    # first-order "would flip" per pair: metric_base + estimate crosses 0 upwards (+1) or downwards (-1)
    counts = pair_scores(r, "flip_count")[0][:, keep]
    np.testing.assert_array_equal(counts, [[0, 0, 0], [0, 0, -1], [1, 0, 0]])
    assert np.array_equal(pair_scores(r, "soft_flip")[0][:, keep] > 0, est > 0)
    # the split of pairs across datasets does not change any score
    whole = AttributionEstimates(None, {"d": r})  # type: ignore[arg-type]
    split = AttributionEstimates(None, {"d": r.take(slice(0, 2)), "e": r.take(slice(2, 4))})  # type: ignore[arg-type]
    for score in SCORES[:-1]:
        np.testing.assert_allclose(split.scores(score), whole.scores(score), err_msg=score)
    # prob ranks the pair near its decision (p(cf) = 0.1) above the far one (0.001); abs does the opposite
    assert whole.scores("prob")[0] > whole.scores("prob")[1] and whole.scores("abs")[1] > whole.scores("abs")[0]
    with pytest.raises(ValueError, match="one of"):
        whole.scores("nonsense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs 'toward'"):
        AttributionEstimates(None, {"d": synthetic_result(toward=None)}).scores("toward")  # type: ignore[arg-type]


def test_flip_ranks_by_count_and_breaks_ties_softly():
    r = synthetic_result(estimates=np.array([[3.0, 7.0, 0.0, 0.0], [2.5, 0.0, 0.0, 0.0], [1.9, 0.0, 0.0, 0.0]]),
                         metric_base=np.array([-2.0, -6.0, 0.5, 0.0]))
    estimates = AttributionEstimates(None, {"d": r})  # type: ignore[arg-type]
    counts = pair_scores(r, "flip_count")[0][:, r.informative].mean(1)
    np.testing.assert_allclose(counts, [2 / 3, 1 / 3, 0.0])
    flip = estimates.scores("flip")
    assert list(np.argsort(-flip)) == [0, 1, 2] and np.all(np.abs(flip - counts) < 1 / 6)
    tied = synthetic_result(estimates=np.array([[2.1, 0.0, 0.0, 0.0], [2.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
                            metric_base=np.array([-2.0, -6.0, 0.5, 0.0]))
    assert list(np.argsort(-AttributionEstimates(None, {"d": tied}).scores("flip"))) == [1, 0, 2]  # type: ignore


def test_screen_selection_counts_and_seeded_sample():
    scores = np.arange(100.0)[::-1]  # cell k has the (k+1)-th largest score
    top, sample = ScreenConfig(top_fraction=0.1, random_fraction=0.2, seed=3).select(scores)
    assert top.tolist() == list(range(10)) and len(sample) == 18 and not set(sample) & set(top)
    again = ScreenConfig(top_fraction=0.1, random_fraction=0.2, seed=3).select(scores)[1]
    other = ScreenConfig(top_fraction=0.1, random_fraction=0.2, seed=4).select(scores)[1]
    assert again.tolist() == sample.tolist() and other.tolist() != sample.tolist()
    assert len(ScreenConfig(top_fraction=0.01, random_fraction=0.0).select(scores)[1]) == 0


@pytest.fixture(scope="module")
def addition():
    from tasks.general_addition.task import TASK, AdditionSettings

    settings = AdditionSettings()
    pipeline = LMPipeline(str(TASK.organism), device="cpu")
    chosen = sweep_cells(pipeline, TASK.token_positions(pipeline, settings), kinds=("residual", "attention"))
    datasets = TASK.make_datasets(settings, ["random", "flip_carry_0"], 8, 0)
    return TASK, UnitAttribution(pipeline, chosen), TASK.main_model(settings), datasets


def test_screen_verifies_the_top_and_a_random_sample(addition, tmp_path):
    task, att, model, datasets = addition
    config = ScreenConfig(top_fraction=0.1, random_fraction=0.1, seed=1, exact_metric=True)
    result = screen_and_verify(att, model, datasets, ["carry_0"], task.checker, config, results_dir=tmp_path / "exact")
    n = len(att.cells)
    verified = result.table[result.table["chosen"] != ""]
    assert result.n_top == int(np.ceil(0.1 * n)) and result.n_random == int(np.ceil(0.1 * (n - result.n_top)))
    assert (result.table["chosen"].iloc[: result.n_top] == "top").all()
    assert verified["exact_mean"].notna().all() and verified["grade"].notna().all()
    assert result.table[result.table["chosen"] == ""]["exact_mean"].isna().all()
    assert (tmp_path / "exact" / "manifest.json").exists()
    json.dumps(result.to_json())
    again = screen_and_verify(att, model, datasets, ["carry_0"], task.checker, config, results_dir=tmp_path / "again")
    assert again.table["chosen"].tolist() == result.table["chosen"].tolist()
    # verdicts only (the default): no exact-metric pass, the same verdicts
    quick = screen_and_verify(att, model, datasets, ["carry_0"], task.checker, config.model_copy(
        update={"exact_metric": False}), results_dir=tmp_path / "quick")
    assert "exact_metric" not in quick.seconds and quick.table["exact_mean"].isna().all()
    columns = ["cell_id", "chosen", "grade", "gained", "lost"]
    assert quick.table[columns].astype(str).equals(result.table[columns].astype(str))
    assert quick.location == result.location


def test_estimates_never_mix_with_exact_results(addition, tmp_path):
    task, att, model, datasets = addition
    estimates = estimate_study(att, model, datasets, ["carry_1"])
    identity = estimates.identity
    assert identity.estimate is True and identity.causal_model_id == model.id
    assert identity.target_variables == ["carry_1"] and identity.kind == "attribution_estimates"
    path = estimates.save(tmp_path / "estimates" / "carry_1.json")
    loaded = AttributionEstimates.load(path)
    assert loaded.identity == identity
    np.testing.assert_allclose(loaded.results["random"].estimates, estimates.results["random"].estimates)
    for score in SCORES[:-1]:  # every ranking but GradDrop's (not estimated here) survives the JSON record
        np.testing.assert_allclose(loaded.scores(score), estimates.scores(score), rtol=1e-5, err_msg=score)
    # pooling the datasets into one pass changes nothing but float noise
    examples = datasets["flip_carry_0"].to_list()
    alone = att.estimate([e["input"] for e in examples], [e["counterfactual_inputs"][0] for e in examples],
                         model.label_data(datasets["flip_carry_0"]),
                         model.label_counterfactual_data(datasets["flip_carry_0"], ["carry_1"], 0))
    pooled = estimates.results["flip_carry_0"]
    for name in ("estimates", "toward", "metric_base", "logp_cf"):
        np.testing.assert_allclose(getattr(pooled, name), getattr(alone, name), atol=1e-4, err_msg=name)
    assert np.array_equal(pooled.greedy_cf, alone.greedy_cf) and np.array_equal(pooled.greedy_base, alone.greedy_base)

    results = tmp_path / "exact"
    screen_and_verify(att, model, datasets, ["carry_1"], task.checker, ScreenConfig(random_fraction=0.0),
                      results_dir=results, estimates=estimates)
    with pytest.raises(ValueError, match="results folder"):
        estimates.save(results / "carry_1.json")
    with pytest.raises(ResultsError, match="unknown origin"):  # a results folder is never created beside estimates
        RawResultsWriter(path.parent, RawResults(results).manifest)
    (tmp_path / "exact.json").write_text(json.dumps({"kind": "attribution_screen", "estimate": False}))
    with pytest.raises(ValueError, match="no attribution estimates"):
        AttributionEstimates.load(tmp_path / "exact.json")
    with pytest.raises(ValueError, match="other cells or another variable"):
        screen_and_verify(att, model, datasets, ["carry_0"], task.checker, estimates=estimates)



def test_path_steps_are_part_of_the_estimates_identity(addition, tmp_path):
    task, att, model, datasets = addition
    small = {"random": datasets["random"]}
    plain = estimate_study(att, model, small, ["carry_1"])
    path = estimate_study(att, model, small, ["carry_1"], path_steps=2)
    assert plain.identity.path_steps == 0 and path.identity.path_steps == 2
    assert plain.identity != path.identity
    assert not np.allclose(plain.results["random"].estimates, path.results["random"].estimates)
    np.testing.assert_array_equal(plain.results["random"].metric_base, path.results["random"].metric_base)
    assert AttributionEstimates.load(path.save(tmp_path / "path.json")).identity == path.identity
    with pytest.raises(ValueError, match="path_steps=2"):
        screen_and_verify(att, model, small, ["carry_1"], task.checker, ScreenConfig(random_fraction=0.0),
                          results_dir=tmp_path / "exact", estimates=path)
