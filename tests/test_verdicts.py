"""Location verdicts: paired exact tests against the unpatched network, Holm/BH across cells, graded
verdicts, controls. Laws: a cell identical to the unpatched network is never a location; a null is located
at most at the nominal rate; a pooled verdict equals its families' when they all agree."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from causal.controls import _permutation, permuted_labels, shuffled_source_labels
from causal.counterfactual_dataset import CounterfactualDataset
from causal.verdicts import (POOLED, VerdictRule, adjust_p_values, compare_hypotheses, paired_test, simulate_null_studies,
                             verdicts_from_per_example)


def per_pair(patched, unpatched, variable="v", cell="c", family="f", expected=None) -> pd.DataFrame:
    patched, unpatched = np.asarray(patched, bool), np.asarray(unpatched, bool)
    return pd.DataFrame({"target_variables": variable, "dataset_id": family, "cell_id": cell,
                         "example_index": np.arange(len(patched)),
                         "expected": expected if expected is not None else ["x"] * len(patched),
                         "correct": patched, "base_correct_on_label": unpatched})


def test_holm_matches_its_definition_and_bh_is_scipys():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 0.2, size=rng.integers(1, 9))
        adjusted = adjust_p_values(p, "holm")
        # Holm: reject H_(i) iff p_(j) <= alpha / (m - j) for every j <= i (sorted); check at several alphas
        for alpha in (0.01, 0.05, 0.1):
            order = np.argsort(p)
            m = len(p)
            reject = np.zeros(m, bool)
            for rank, index in enumerate(order):
                if p[index] <= alpha / (m - rank):
                    reject[index] = True
                else:
                    break
            assert ((adjusted <= alpha) == reject).all()
        np.testing.assert_allclose(adjust_p_values(p, "bh"), stats.false_discovery_control(p, method="bh"))


def test_paired_test_effect_and_exact_p():
    effect, low, high, p = paired_test(gained=12, lost=2, n=40)
    assert effect == pytest.approx(10 / 40)
    assert p == pytest.approx(stats.binomtest(12, 14, 0.5, alternative="greater").pvalue)
    assert low < effect < high
    assert paired_test(0, 0, 40) == (0.0, 0.0, 0.0, 1.0)


def test_cell_identical_to_unpatched_network_is_never_a_location():
    rng = np.random.default_rng(1)
    for _ in range(20):
        unpatched = rng.random(200) < rng.random()
        verdicts = verdicts_from_per_example("h", per_pair(unpatched, unpatched))
        assert verdicts.verdict("v") == "none" and verdicts.location("v") is None


def test_half_right_hypothesis_is_not_located_although_its_old_informative_iia_is_high():
    # the patch moves 50 outputs towards the label and 50 away from it: no effect
    patched = np.r_[np.ones(50, bool), np.zeros(50, bool), np.ones(100, bool)]
    unpatched = np.r_[np.zeros(50, bool), np.ones(50, bool), np.ones(100, bool)]
    verdicts = verdicts_from_per_example("h", per_pair(patched, unpatched))
    row = verdicts.tests.iloc[0]
    assert row["effect"] == 0 and verdicts.verdict("v") == "none"
    # restricted to the pairs the patch moved towards the label, the old informative IIA would read 1.0
    assert patched[:50].mean() == 1.0


def test_full_partial_none_grades():
    n = 200
    unpatched = np.zeros(n, bool)
    full = verdicts_from_per_example("h", per_pair(np.ones(n, bool), unpatched))
    assert full.verdict("v") == "full"
    partial_patch = np.r_[np.ones(60, bool), np.zeros(140, bool)]
    assert verdicts_from_per_example("h", per_pair(partial_patch, unpatched)).verdict("v") == "partial"
    weak = np.r_[np.ones(2, bool), np.zeros(198, bool)]
    assert verdicts_from_per_example("h", per_pair(weak, unpatched)).verdict("v") == "none"


def test_unfit_hypothesis_is_unsupported():
    n = 100
    base = pd.DataFrame({"dataset_id": ["f"], "n": [n], "n_correct": [50]})
    verdicts = verdicts_from_per_example("h", per_pair(np.ones(n, bool), np.zeros(n, bool)), base_accuracy=base)
    assert not verdicts.fits and verdicts.verdict("v") == "unsupported" and verdicts.location("v") is None


def test_pooled_verdict_equals_families_when_they_agree():
    frames = [per_pair(np.r_[np.ones(40, bool), np.zeros(10, bool)], np.zeros(50, bool), family=f) for f in "abc"]
    verdicts = verdicts_from_per_example("h", pd.concat(frames, ignore_index=True))
    grades = {scope: verdicts.verdict("v", scope) for scope in (POOLED, "a", "b", "c")}
    assert set(grades.values()) == {"partial"} and not verdicts.disagreements


def test_a_family_with_the_opposite_sign_is_reported():
    good = per_pair(np.ones(80, bool), np.zeros(80, bool), family="good")
    bad = per_pair(np.zeros(20, bool), np.ones(20, bool), family="bad")
    verdicts = verdicts_from_per_example("h", pd.concat([good, bad], ignore_index=True))
    assert verdicts.verdict("v") in ("full", "partial")
    assert any("bad" in line and "other sign" in line for line in verdicts.disagreements)


@pytest.mark.slow
@pytest.mark.parametrize("correction", ["holm", "bh"])
def test_null_is_located_at_most_at_the_nominal_rate(correction):
    rule = VerdictRule(correction=correction)
    n = 200
    rate = simulate_null_studies(n, rule)
    # the observed rate must not be significantly above alpha
    assert stats.binomtest(round(rate * n), n, rule.alpha, alternative="greater").pvalue > 0.01, rate


@pytest.mark.slow
def test_the_simulation_can_fail():
    """The same simulation flags a rule that is too loose (alpha = 0.5)."""
    rate = simulate_null_studies(100, VerdictRule(alpha=0.5))
    assert rate > 0.05


def test_exact_p_equals_scipys_binomtest_and_the_bootstrap_ci_covers():
    for gained, lost in [(0, 0), (0, 5), (5, 0), (7, 3), (30, 29), (1, 40)]:
        n = gained + lost + 17
        effect, low, high, p = paired_test(gained, lost, n)
        if gained + lost:
            test = stats.binomtest(gained, gained + lost, 0.5, alternative="greater")
            assert p == pytest.approx(test.pvalue, rel=1e-9, abs=1e-15)
            assert low <= effect <= high
    # coverage of the 95% interval, including a case with no lost pair (where a conditional interval fails)
    rng = np.random.default_rng(1)
    for p_gain, p_lose in [(0.59, 0.0), (0.2, 0.01)]:
        n, runs, covered = 640, 200, 0
        for _ in range(runs):
            g, l, _ = rng.multinomial(n, [p_gain, p_lose, 1 - p_gain - p_lose])
            _, low, high, _ = paired_test(int(g), int(l), n)
            covered += low <= p_gain - p_lose <= high
        assert covered / runs >= 0.9, (p_gain, p_lose, covered / runs)


@pytest.mark.slow
def test_per_family_verdicts_are_corrected_across_families():
    rate = simulate_null_studies(200, VerdictRule(), n_families=5, scope="families")
    assert stats.binomtest(round(rate * 200), 200, 0.05, alternative="greater").pvalue > 0.01, rate


def test_a_control_is_scored_only_where_its_label_differs_from_the_truth():
    from causal.controls import pairs_where_control_differs

    rng = np.random.default_rng(0)
    n = 400
    true = np.where(rng.random(n) < 0.8, "0", "1")  # two outputs: permuted labels often coincide with true ones
    patched_follows_truth = np.ones(n, bool)
    unpatched = rng.random(n) < 0.5
    control = rng.permutation(true)
    true_pairs = per_pair(patched_follows_truth, unpatched, expected=true)
    control_pairs = per_pair(control == true, np.where(unpatched, control == true, control != true),
                             variable="permuted:v", expected=control)
    naive = verdicts_from_per_example("controls", control_pairs)
    kept = pairs_where_control_differs(control_pairs, true_pairs)
    assert len(kept) == int((control != true).sum())
    assert verdicts_from_per_example("controls", kept).verdict("permuted:v") == "none"
    assert naive.verdict("permuted:v") in ("full", "partial"), "without the restriction the control would be located"


def test_compare_hypotheses_uses_only_pairs_where_labels_differ():
    first = per_pair([1, 1, 1, 0, 1], [0] * 5, expected=["a", "b", "c", "d", "e"])
    second = per_pair([0, 0, 1, 1, 1], [0] * 5, expected=["x", "y", "c", "z", "e"])
    table = compare_hypotheses(first, second)
    row = table.iloc[0]
    assert row["n_differ"] == 3 and row["first_only"] == 2 and row["second_only"] == 1


def test_controls_are_deterministic_and_never_keep_a_pair_label():
    from causal.causal_model import CausalModel

    model = CausalModel(
        variables=["a", "b", "raw_input", "raw_output"],
        values={"a": list(range(5)), "b": list(range(5)), "raw_input": None, "raw_output": None},
        parents={"a": [], "b": [], "raw_input": ["a", "b"], "raw_output": ["a", "b"]},
        mechanisms={"a": lambda: 0, "b": lambda: 0, "raw_input": lambda a, b: f"{a}+{b}",
                    "raw_output": lambda a, b: str(a + b)},
        id="toy",
    )
    examples = [{"input": {"a": i % 5, "b": (2 * i) % 5}, "counterfactual_inputs": [{"a": (i + 1) % 5, "b": 0}]}
                for i in range(12)]
    dataset = CounterfactualDataset.from_examples(
        [{"input": model.new_raw_input(e["input"]),
          "counterfactual_inputs": [model.new_raw_input(c) for c in e["counterfactual_inputs"]]} for e in examples],
        id="toy")
    perm = _permutation(dataset, 0, "x")
    assert sorted(perm.tolist()) == list(range(12)) and not (perm == np.arange(12)).any()
    first = permuted_labels(model, "a")(dataset)
    assert first == permuted_labels(model, "a")(dataset)
    assert sorted(first) == sorted(model.label_counterfactual_data(dataset, ["a"]))
    assert len(shuffled_source_labels(model, "a")(dataset)) == 12
    with pytest.raises(ValueError, match="not a variable"):
        permuted_labels(model, "nope")


# ---------------------------------------------------------------------------- refuse what cannot be scored
def _toy_model(raising: bool = False):
    from causal.causal_model import CausalModel

    def total(a, b):
        if raising and a == 3:
            raise ZeroDivisionError("division by zero")
        return str(a + b)

    return CausalModel(
        variables=["a", "b", "raw_input", "raw_output"],
        values={"a": list(range(5)), "b": list(range(5)), "raw_input": None, "raw_output": None},
        parents={"a": [], "b": [], "raw_input": ["a", "b"], "raw_output": ["a", "b"]},
        mechanisms={"a": lambda: 0, "b": lambda: 0, "raw_input": lambda a, b: f"{a}+{b}", "raw_output": total},
        id="toy",
    )


def test_a_dataset_lacking_an_input_variable_is_refused():
    model = _toy_model()
    examples = [{"input": {"a": i, "raw_input": f"{i}"}, "counterfactual_inputs": [{"a": 1, "raw_input": "1"}]}
                for i in range(3)]  # made for a model without b
    with pytest.raises(ValueError, match=r"input variable\(s\) \['b'\]"):
        model.label_counterfactual_data(examples, ["a"])
    with pytest.raises(ValueError, match=r"\['b'\]"):
        model.label_data(examples)


def test_a_raising_mechanism_names_its_variable_and_example():
    from causal.causal_model import MechanismError

    model = _toy_model(raising=True)
    examples = [{"input": {"a": i, "b": 0}, "counterfactual_inputs": [{"a": 0, "b": 1}]} for i in range(5)]
    with pytest.raises(MechanismError, match=r"mechanism of 'raw_output' raised ZeroDivisionError.*example 3"):
        model.label_data(examples)


def test_a_raising_checker_names_output_and_label():
    from causal.interchange_scores import _MemoChecker

    def picky(output, expected):
        return int(output) == expected

    with pytest.raises(ValueError, match=r"checker 'picky' raised ValueError.*'abc'"):
        _MemoChecker(picky)("abc", 3)
