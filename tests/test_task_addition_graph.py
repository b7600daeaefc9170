"""Addition task: carry graph, competing hypothesis, samplers, checker."""

from __future__ import annotations

import random

import pytest

from tasks.general_addition.causal_models import (
    DEFAULT_TEMPLATE,
    PROMPT_TEMPLATES,
    addends_of,
    build_addition_model,
    build_tens_without_carry_model,
    carries_of,
    digit_vars,
    setting_from_addends,
)
from tasks.general_addition.checker import addition_checker
from tasks.general_addition.counterfactuals import ADDITION_FAMILIES, make_addition_datasets


def s(a: int, b: int, d: int = 2, template: str = DEFAULT_TEMPLATE) -> dict:
    return setting_from_addends(a, b, d, template)


# ---------------------------------------------------------------- graph


def test_variables_and_structure():
    m = build_addition_model(3)
    assert m.id == "addition_3d_carry"
    assert set(m.inputs) == {"template", *digit_vars(3)}
    assert m.parents["carry_0"] == ["digit_0_0", "digit_1_0"]
    assert m.parents["carry_2"] == ["digit_0_2", "digit_1_2", "carry_1"]
    assert m.parents["output_digit_3"] == ["carry_2"]
    assert m.parents["output_digit_1"] == ["digit_0_1", "digit_1_1", "carry_0"]
    assert list(m.values["template"]) == list(PROMPT_TEMPLATES)
    assert m.values["raw_output"] is None and m.values["raw_input"] is None
    assert build_addition_model(2, templates=["qa"]).values["template"] == ["qa"]
    with pytest.raises(ValueError):
        build_addition_model(5)
    with pytest.raises(ValueError):
        build_addition_model(2, templates=["nope"])


def test_58_plus_67():
    m = build_addition_model(2)
    setting = s(58, 67)
    assert setting == {
        "template": "compact",
        "digit_0_1": 5,
        "digit_0_0": 8,
        "digit_1_1": 6,
        "digit_1_0": 7,
        "raw_input": "58+67=",
    }
    out = m.run_forward(setting)
    assert (out["carry_0"], out["carry_1"]) == (1, 1)
    assert [out[f"output_digit_{p}"] for p in range(3)] == [5, 2, 1]
    assert out["raw_output"] == "125"
    assert m.run_forward()["raw_input"] == "58+67="  # root defaults


def test_leading_zeros_and_templates():
    m = build_addition_model(2)
    assert s(5, 23)["raw_input"] == "05+23="
    assert m.run_forward(s(5, 23))["raw_output"] == "28"
    assert m.run_forward(s(0, 0))["raw_output"] == "0"
    assert s(58, 67, template="plus_words")["raw_input"] == "What is 58 plus 67? Answer:"
    assert s(58, 67, template="qa")["raw_input"] == "Q: 58+67=? A:"
    assert s(7, 3, 4)["raw_input"] == "0007+0003="
    assert addends_of(s(5, 23)) == (5, 23)


def test_three_and_four_digit_examples():
    m3 = build_addition_model(3)
    out = m3.run_forward(s(999, 1, 3))
    assert [out[f"carry_{p}"] for p in range(3)] == [1, 1, 1]
    assert out["raw_output"] == "1000"
    out = m3.run_forward(s(456, 321, 3))
    assert [out[f"carry_{p}"] for p in range(3)] == [0, 0, 0] and out["raw_output"] == "777"
    m4 = build_addition_model(4)
    out = m4.run_forward(s(4738, 5295, 4))  # 8+5=13 c1; 3+9+1=13 c1; 7+2+1=10 c1; 4+5+1=10 c1
    assert [out[f"carry_{p}"] for p in range(4)] == [1, 1, 1, 1]
    assert [out[f"output_digit_{p}"] for p in range(5)] == [3, 3, 0, 0, 1]
    assert out["raw_output"] == "10033"
    out = m4.run_forward(s(1050, 2049, 4))  # 0+9; 5+4; 0+0; 1+2
    assert [out[f"carry_{p}"] for p in range(4)] == [0, 0, 0, 0] and out["raw_output"] == "3099"


def test_forward_matches_arithmetic():
    rng = random.Random(0)
    for d in (2, 3, 4):
        m = build_addition_model(d)
        for _ in range(100):
            a, b = rng.randrange(10**d), rng.randrange(10**d)
            out = m.run_forward(s(a, b, d))
            assert out["raw_output"] == str(a + b)
            assert [out[f"carry_{p}"] for p in range(d)] == carries_of(a, b, d)


def test_interchange_carry_and_digit():
    m = build_addition_model(2)
    # carry_0 from 51+12 (carry_0 = 0): 58+67 computed without the ones carry -> 115
    assert m.run_interchange(s(58, 67), {"carry_0": s(51, 12)})["raw_output"] == "115"
    # carry_1 from a pair without a tens carry drops the hundreds digit
    assert m.run_interchange(s(58, 67), {"carry_1": s(10, 10)})["raw_output"] == "25"
    # digit_0_0 from 51+12 (=1): 51+67 = 118
    assert m.run_interchange(s(58, 67), {"digit_0_0": s(51, 12)})["raw_output"] == "118"
    # two variables at once: both ones digits from 51+12 -> 51+62 = 113
    out = m.run_interchange(s(58, 67), {"digit_0_0": s(51, 12), "digit_1_0": s(51, 12)})
    assert out["raw_output"] == "113"


def test_interchange_arrow_form():
    m = build_addition_model(2)
    # base digit_0_0 takes the counterfactual's digit_1_1 (=9 in 10+90): 59+67 = 126
    assert m.run_interchange(s(58, 67), {"digit_0_0<-digit_1_1": s(10, 90)})["raw_output"] == "126"
    # base carry_1 takes the counterfactual's carry_0 (0 in 11+11): 58+67 -> 25
    assert m.run_interchange(s(58, 67), {"carry_1<-carry_0": s(11, 11)})["raw_output"] == "25"


def test_interchange_with_base_itself_changes_nothing():
    rng = random.Random(1)
    for d in (2, 3, 4):
        for m in (build_addition_model(d), build_tens_without_carry_model(d)):
            for _ in range(10):
                base = m.sample_input(rng=rng)
                expected = m.run_forward(base)
                for var in m.variables:
                    assert m.run_interchange(base, {var: dict(base)}) == expected, (m.id, var)


def test_competitor_differs_exactly_when_carry_0():
    rng = random.Random(2)
    for d in (2, 3, 4):
        true_m, wrong_m = build_addition_model(d), build_tens_without_carry_model(d)
        assert wrong_m.id == f"addition_{d}d_tens_no_carry"
        assert wrong_m.variables == true_m.variables
        assert wrong_m.parents["output_digit_1"] == ["digit_0_1", "digit_1_1"]
        assert wrong_m.parents["carry_1"] == true_m.parents["carry_1"]
        seen = set()
        for _ in range(300):
            a, b = rng.randrange(10**d), rng.randrange(10**d)
            setting = s(a, b, d)
            t, w = true_m.run_forward(setting), wrong_m.run_forward(setting)
            differ = t["raw_output"] != w["raw_output"]
            assert differ == (t["carry_0"] == 1)
            assert t["carry_1"] == w["carry_1"]
            seen.add(differ)
        assert seen == {True, False}
    assert build_tens_without_carry_model(2).run_forward(s(58, 67))["raw_output"] == "115"


# ---------------------------------------------------------------- samplers


def _inputs_differ(a: dict, b: dict, d: int) -> list[str]:
    return [v for v in digit_vars(d) if a[v] != b[v]]


@pytest.mark.parametrize("d", [2, 3, 4])
def test_samplers_keep_their_promises(d):
    m = build_addition_model(d)
    datasets = make_addition_datasets(d, 60, seed=0)
    assert list(datasets) == ADDITION_FAMILIES(d)
    assert ADDITION_FAMILIES(d) == ["random", "change_one_digit", *[f"flip_carry_{k}" for k in range(d)], "same_sum"]
    for family, ds in datasets.items():
        assert ds.id == family and len(ds) == 60
        for ex in ds:
            base, (cf,) = ex["input"], ex["counterfactual_inputs"]
            assert base["template"] == cf["template"] == DEFAULT_TEMPLATE
            assert set(base) == set(cf) == {"template", *digit_vars(d), "raw_input"}
            for setting in (base, cf):
                assert setting == setting_from_addends(*addends_of(setting), d, setting["template"])
            tb, tc = m.run_forward(base), m.run_forward(cf)
            if family == "change_one_digit":
                assert len(_inputs_differ(base, cf, d)) == 1
            elif family.startswith("flip_carry_"):
                k = int(family.rsplit("_", 1)[1])
                assert tb[f"carry_{k}"] != tc[f"carry_{k}"]
            elif family == "same_sum":
                assert sum(addends_of(base)) == sum(addends_of(cf))
                assert _inputs_differ(base, cf, d)


def test_template_kept_for_other_templates():
    for ds in make_addition_datasets(2, 20, seed=3, template="plus_words").values():
        for ex in ds:
            assert ex["input"]["template"] == ex["counterfactual_inputs"][0]["template"] == "plus_words"
            assert ex["input"]["raw_input"].startswith("What is ")
    with pytest.raises(ValueError):
        make_addition_datasets(2, 5, seed=0, families=["nope"])


def test_datasets_deterministic_under_seed():
    def prints(seed, families=None):
        return {k: v.fingerprint() for k, v in make_addition_datasets(3, 30, seed, families).items()}

    first = prints(7)
    assert prints(7) == first
    assert prints(8) != first
    # one family's data does not depend on which other families are requested
    assert prints(7, ["same_sum"])["same_sum"] == first["same_sum"]
    assert len(set(first.values())) == len(first)


def test_label_counterfactual_data_on_flip_carry():
    m = build_addition_model(2)
    ds = make_addition_datasets(2, 30, seed=0, families=["flip_carry_0"])["flip_carry_0"]
    labels = m.label_counterfactual_data(ds, ["carry_0"])
    for ex, label in zip(ds, labels):
        a, b = addends_of(ex["input"])
        c0 = carries_of(a, b, 2)[0]
        assert int(label) == a + b + (10 if c0 == 0 else -10)


# ---------------------------------------------------------------- checker


def test_addition_checker():
    assert addition_checker("125", "125")
    assert addition_checker(" 125 ", 125)
    assert addition_checker("125\n58+1=59", "125")
    assert addition_checker("125 is the answer", "125")
    assert addition_checker("125<eos>", "125")
    assert not addition_checker("12", "125")
    assert not addition_checker("1", "125")
    assert not addition_checker("1250", "125")
    assert not addition_checker("135", "125")
    assert not addition_checker("", "125")
    assert not addition_checker("answer: 125", "125")
    assert addition_checker("28", "28") and not addition_checker("028", "28")
