"""The analysis toolkit (experiments.analysis): statistics by hand, invariances on every family, probes and
the ``analyze`` command on the organism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from experiments.analysis.attention import (
    attention_entropy,
    attention_matrices,
    k_effective,
    profile_attention,
    row_statistics,
)
from experiments.analysis.stats import benjamini_hochberg, correlation, ols_slope
from tests.conftest import FAMILIES

PROMPTS = ["12+34=", "5+67=", "890+1="]


# ---------------------------------------------------------------------------- hand-computed statistics
@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_uniform_attention(n: int) -> None:
    p = torch.full((n,), 1.0 / n)
    assert attention_entropy(p).item() == pytest.approx(math.log(n))
    assert k_effective(p, 0.9).item() == math.ceil(0.9 * n - 1e-9)
    assert k_effective(p, 1.0).item() == n


def test_one_hot_attention() -> None:
    p = torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert attention_entropy(p).item() == 0.0
    assert k_effective(p).item() == 1
    stats = row_statistics(p[None], torch.ones(1, 4, dtype=torch.bool))
    assert stats["max_attention"].item() == 1.0 and stats["perplexity"].item() == 1.0


def test_masked_keys_and_sinks_are_renormalised() -> None:
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    mask = torch.tensor([[False, True, True, False]])  # key 0 a sink, key 3 padding
    stats = row_statistics(p, mask)
    assert stats["entropy"].item() == pytest.approx(math.log(2))
    assert stats["n_keys"].item() == 2 and stats["kept_mass"].item() == pytest.approx(0.5)
    assert stats["k_eff"].item() == 2


def test_k_eff_hand_example() -> None:
    assert k_effective(torch.tensor([0.5, 0.3, 0.15, 0.05]), 0.9).item() == 3
    assert k_effective(torch.tensor([0.05, 0.6, 0.35]), 0.9).item() == 2


def test_bh_and_slope_by_hand() -> None:
    q = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.2]))
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.2])  # p·m/rank: .04, .06, .0533, .2, then monotone
    fit = ols_slope(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 3.0, 5.0, 7.0]))
    assert fit.slope == pytest.approx(2.0) and fit.r2 == pytest.approx(1.0) and fit.se == pytest.approx(0.0)
    r = correlation(np.arange(10.0), np.arange(10.0) ** 3)
    assert r["spearman_r"] == pytest.approx(1.0) and r["pearson_p"] < 1e-3


def test_bh_matches_scipy_with_nans() -> None:
    """q-values are scipy's BH over the non-NaN entries, in the input's order; NaN in, NaN out."""
    from scipy import stats

    rng = np.random.default_rng(7)
    for n in (1, 2, 9, 200):
        p = rng.uniform(size=n) ** 3
        np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p, method="bh"),
                                   rtol=1e-12, atol=0)
        with_nan = p.copy()
        holes = rng.random(n) < 0.3
        with_nan[holes] = np.nan
        q = benjamini_hochberg(with_nan)
        assert q.shape == p.shape and np.isnan(q[holes]).all() and not np.isnan(q[~holes]).any()
        if (~holes).any():
            np.testing.assert_allclose(q[~holes], stats.false_discovery_control(p[~holes], method="bh"),
                                       rtol=1e-12, atol=0)
    assert benjamini_hochberg(np.array([])).shape == (0,)
    assert np.isnan(benjamini_hochberg(np.array([np.nan, np.nan]))).all()
    np.testing.assert_allclose(benjamini_hochberg(np.array([0.0, 1.0, 0.5])), [0.0, 1.0, 0.75])


def test_ols_slope_matches_independent_fits() -> None:
    """Slope and intercept agree with numpy's polyfit, SE and R² with scipy's linregress; edge cases NaN."""
    from scipy import stats

    rng = np.random.default_rng(11)
    for n in (3, 5, 40, 500):
        x = rng.normal(size=n) * 3 + 1
        y = 0.7 * x + rng.normal(size=n)
        fit, ref = ols_slope(x, y), stats.linregress(x, y)
        slope, intercept = np.polyfit(x, y, 1)
        assert fit.n == n
        assert fit.slope == pytest.approx(slope, rel=1e-9) and fit.intercept == pytest.approx(intercept, rel=1e-9)
        resid = y - intercept - slope * x
        assert fit.se == pytest.approx(np.sqrt((resid ** 2).sum() / (n - 2) / ((x - x.mean()) ** 2).sum()), rel=1e-9)
        assert fit.r2 == pytest.approx(1 - (resid ** 2).sum() / ((y - y.mean()) ** 2).sum(), rel=1e-9)
        assert (fit.se, fit.r2) == pytest.approx((ref.stderr, ref.rvalue ** 2), rel=1e-12)
    for x, y in [(np.array([]), np.array([])), (np.array([1.0]), np.array([2.0])),
                 (np.ones(5), rng.normal(size=5)), (np.array([0.0, 1.0, 2.0]), np.array([1.0, np.nan, 2.0]))]:
        fit = ols_slope(x, y)
        assert fit.n == len(x) and all(np.isnan([fit.slope, fit.intercept, fit.se, fit.r2]))
    two = ols_slope(np.array([0.0, 1.0]), np.array([3.0, 5.0]))  # exact line, no residual dof
    assert (two.slope, two.intercept, two.r2) == (2.0, 3.0, 1.0) and np.isnan(two.se)
    flat = ols_slope(rng.normal(size=6), np.full(6, 2.0))  # exact fit, nothing to explain
    assert (flat.slope, flat.intercept, flat.se) == (0.0, 2.0, 0.0) and np.isnan(flat.r2)


# ---------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", FAMILIES)
def test_profile_matches_recorded_attention(pipelines, family: str) -> None:
    """The profiler's statistics are those of the probabilities the model runs (recorded, post-rotary)."""
    pipe = pipelines[family]
    table = profile_attention(pipe, PROMPTS, layers=[1], progress=False)
    n_rep = pipe.num_heads // pipe.num_kv_heads
    assert (table["kv_head"] == table["head"] // n_rep).all()
    probs, _ = attention_matrices(pipe, PROMPTS[2], 1)  # the longest prompt: no padding
    row = table[(table.example == 2) & (table.position == len(probs[0]) - 1)].sort_values("head")
    want = attention_entropy(torch.tensor(probs[:, -1, :], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(row["entropy"].to_numpy(), want, atol=1e-5)
    np.testing.assert_allclose(row["max_attention"].to_numpy(), probs[:, -1, :].max(-1), atol=1e-6)
    # padding queries are excluded: each example has exactly its own number of tokens per head
    lengths = [len(pipe.tokenize_one(p)["input_ids"]) for p in PROMPTS]
    counts = table[table["head"] == 0].groupby("example").size().tolist()
    assert counts == lengths


@pytest.mark.parametrize("family", FAMILIES)
def test_lens_at_last_layer_is_the_model(pipelines, family: str) -> None:
    from experiments.analysis.lens import lens_logits

    pipe = pipelines[family]
    batch = pipe.load(PROMPTS)
    lens = lens_logits(pipe, batch, layers=[pipe.num_layers - 1])[pipe.num_layers - 1]
    with torch.no_grad():
        logits = pipe.model(**batch.model_inputs()).logits.float()
    real = batch.attention_mask.bool()
    torch.testing.assert_close(lens[real], logits[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_scaling_invariances(pipelines, family: str) -> None:
    """Scaling by 1 changes nothing; a head's queries at all positions ≡ its keys at all positions."""
    from experiments.analysis.scaling import scaling_sweep

    pipe = pipelines[family]
    layer, head = 1, 3
    base = profile_attention(pipe, PROMPTS, layers=[layer], heads=[head], query_positions=[-1], progress=False)
    one = scaling_sweep(pipe, PROMPTS, layer, head, [1.0], controls=[])
    np.testing.assert_allclose(one.sort_values("example")["max_attention"].to_numpy(),
                               base.sort_values("example")["max_attention"].to_numpy(), atol=1e-6)
    q = scaling_sweep(pipe, PROMPTS, layer, head, [0.5, 3.0], target="query", where="all")
    k = scaling_sweep(pipe, PROMPTS, layer, head, [0.5, 3.0], target="key", where="all")
    np.testing.assert_allclose(q["entropy"].to_numpy(), k["entropy"].to_numpy(), atol=1e-5)
    scaled = q[(q.factor == 3.0) & (q.role == "target")].sort_values("example")["entropy"].to_numpy()
    assert not np.allclose(scaled, one.sort_values("example")["entropy"].to_numpy(), atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_ablating_nothing_changes_nothing(pipelines, family: str) -> None:
    from experiments.analysis.ablation import ablated

    pipe = pipelines[family]
    batch = pipe.load(PROMPTS)
    with torch.no_grad():
        clean = pipe.model(**batch.model_inputs()).logits
        with ablated(pipe, []):
            same = pipe.model(**batch.model_inputs()).logits
        with ablated(pipe, [("head", 0, 1)]):
            changed = pipe.model(**batch.model_inputs()).logits
    assert torch.equal(clean, same)
    assert not torch.allclose(clean, changed)


def test_out_of_range_targets_are_named(pipelines) -> None:
    from experiments.analysis.ablation import ablated
    from experiments.analysis.scaling import scaling_sweep

    pipe = pipelines["llama"]
    with pytest.raises(ValueError, match="layer 7 out of range"):
        profile_attention(pipe, PROMPTS, layers=[7], progress=False)
    with pytest.raises(ValueError, match="head 9 out of range"):
        scaling_sweep(pipe, PROMPTS, 0, 9)
    with pytest.raises(ValueError, match="layer 5 out of range"):
        with ablated(pipe, [("mlp", 5)]):
            pass


# ---------------------------------------------------------------------------- the organism
@pytest.fixture(scope="module")
def organism():
    from experiments.pipeline import LMPipeline
    from tasks.general_addition.organism import ORGANISM_DIR

    if not (ORGANISM_DIR / "config.json").exists():
        pytest.skip("organism checkpoint absent")
    torch.set_num_threads(1)
    return LMPipeline(str(ORGANISM_DIR), max_new_tokens=5, device="cpu")


def test_addition_roles(organism) -> None:
    from tasks.general_addition.analysis import parse_example, roles

    s = parse_example("59+73")  # carries at both places
    r = roles(organism, s)
    assert r["operator"] == [3, 6] and r["place_0"] == [2, 5] and r["carry_digits"] == [1, 2, 4, 5]
    r = roles(organism, parse_example("12+34"))
    assert r["carry_digits"] == [] and r["no_carry_digits"] == [1, 2, 4, 5]


def test_probes_beat_the_shuffled_control(organism) -> None:
    from experiments.analysis.probes import collect_features, probe_table
    from tasks.general_addition import analysis as task

    settings = task.sample(160, seed=1)
    positions = [task.positions(organism, s) for s in settings]
    features = collect_features(organism, settings, positions, layers=[2], progress=False)
    features = {k: v for k, v in features.items() if k[1] == "last"}
    row = probe_table(features, task.labels(settings, "carry_0"), "carry_0", seed=0).iloc[0]
    assert row["accuracy"] >= 0.85
    assert row["ci_low"] > row["control_accuracy"] and row["above_control"]


def test_patching_recovers_fully_at_the_last_layer(organism) -> None:
    import random

    from experiments.analysis.patching import activation_patching
    from tasks.general_addition import analysis as task

    clean = [task.parse_example("59+73"), task.parse_example("12+34")]
    corrupted = [task.corrupt(s, random.Random(0)) for s in clean]
    table = activation_patching(organism, clean, corrupted, layers=[-1, organism.num_layers - 1], progress=False)
    last = table[(table.layer == organism.num_layers - 1) & (table.position == 6)]
    np.testing.assert_allclose(last["recovery"], 1.0, atol=1e-5)
    first = table[(table.layer == -1) & (table.position == 0)]  # the BOS token is the same in both prompts
    np.testing.assert_allclose(first["recovery"], 0.0, atol=1e-5)


@pytest.mark.slow
def test_analyze_command_end_to_end(tmp_path, organism) -> None:
    from experiments.analyze import main

    out = tmp_path / "report"
    config = tmp_path / "analysis.yaml"
    config.write_text("n_examples: 40\nn_ablation: 24\nn_gain: 8\nn_patch_pairs: 2\nfactors: [0.5, 1.0, 2.0]\n"
                      "probe_variables: [carry_0]\nablation_kinds: [zero]\nprogress: false\nthreads: 1\n")
    rc = main(["--model", "organism", "--task", "general_addition", "--all", "--examples", "59+73", "12+34",
               "--out", str(out), "--config", str(config), "--device", "cpu"])
    assert rc == 0
    for folder in ("attention", "logit_lens", "circuits", "probing", "interventions", "gain"):
        assert any((out / folder).glob("*.png")), folder
    index = json.loads((out / "index.json").read_text())
    assert all((out / f["path"]).exists() and f["reading"] for f in index["figures"])
    html = (out / "index.html").read_text()
    assert all(f["path"] in html for f in index["figures"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interventions"]["clean_accuracy"] > 0.9
    assert main(["--out", str(out), "--compare", str(out)]) == 0
    assert (out / "compare.html").exists()


def test_bad_config_is_refused(tmp_path) -> None:
    from experiments.analyze import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("n_exampels: 5\n")
    assert main(["--config", str(bad), "--out", str(tmp_path / "o")]) == 2


def test_an_unknown_device_is_refused_in_one_line_before_any_work(tmp_path, capsys) -> None:
    from experiments.analyze import main

    assert main(["--device", "tpu", "--lens", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown device 'tpu'" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_default_scaling_control_can_move(pipelines, family: str) -> None:
    """The default control (the same head one layer up) reads what the scaled head writes: its read row changes
    with the factor (a same-layer head could not: the scaled queries are the target head's own copy)."""
    from experiments.analysis.scaling import scaling_sweep

    pipe = pipelines[family]
    sweep = scaling_sweep(pipe, PROMPTS, 0, 1, [0.25, 4.0])
    control = sweep[sweep.role == "control"]
    assert set(zip(control.m_layer, control.m_head)) == {(1, 1)}
    low = control[control.factor == 0.25].sort_values("example")["entropy"].to_numpy()
    high = control[control.factor == 4.0].sort_values("example")["entropy"].to_numpy()
    assert not np.allclose(low, high, atol=1e-6)
    top = scaling_sweep(pipe, PROMPTS, pipe.num_layers - 1, 1, [0.5, 2.0])
    assert set(top.role) == {"target"}  # no layer above the last: no control that could move


def test_query_vs_key_refuses_the_degenerate_default(pipelines) -> None:
    from experiments.analysis.scaling import query_vs_key

    with pytest.raises(ValueError, match="ratio would be 1 by construction"):
        query_vs_key(pipelines["llama"], PROMPTS, 1, 0, [0.5, 2.0])


def test_sink_mass_is_measured_only_where_tokens_are_set_aside(pipelines) -> None:
    pipe = pipelines["llama"]
    none = profile_attention(pipe, PROMPTS, layers=[0], query_positions=[-1], progress=False)
    assert none["sink_mass"].isna().all()
    one = profile_attention(pipe, PROMPTS, layers=[0], query_positions=[-1], sink_tokens=1, progress=False)
    assert (one["sink_mass"] > 0).all()


def test_n_keys_counts_only_the_sliding_window(char_tokenizer) -> None:
    from experiments.pipeline import LMPipeline
    from tests.conftest import make_model

    model = make_model("gemma2", len(char_tokenizer))
    model.config.sliding_window = 3
    pipe = LMPipeline(model, tokenizer=char_tokenizer, device="cpu")
    types = model.config.layer_types
    table = profile_attention(pipe, ["12+345=", "7+8="], query_positions=[-1], progress=False)
    for layer, kind in enumerate(types):
        rows = table[table.layer == layer]
        if kind == "sliding_attention":
            assert (rows["n_keys"] <= 3).all()
        else:
            assert (rows["n_keys"] > 3).any()
