"""Decimal comparison task: numeric vs whole-number-fraction hypotheses, samplers, checker."""

from __future__ import annotations

import random

import pytest

from tasks.decimal_comparison.causal_models import (
    FORMATS,
    FRAC_PARTS,
    NUMBERS,
    answer_numeric,
    answer_whole,
    build_numeric_model,
    build_whole_number_fraction_model,
    hypotheses_disagree,
    make_setting,
)
from tasks.decimal_comparison.checker import decimal_checker
from tasks.decimal_comparison.counterfactuals import DECIMAL_FAMILIES, make_decimal_datasets

NUMERIC = build_numeric_model()
WHOLE = build_whole_number_fraction_model()


def test_domains():
    assert len(FRAC_PARTS) == 99 and len(set(FRAC_PARTS)) == 99
    assert not any(f.endswith("0") for f in FRAC_PARTS)
    assert len(NUMBERS) == 21 * 99
    assert {"9.8", "9.11", "0.05", "20.99"} <= set(NUMBERS)
    assert NUMERIC.variables == WHOLE.variables
    assert NUMERIC.parents == WHOLE.parents
    assert set(NUMERIC.inputs) == {"x", "y", "format"}
    with pytest.raises(ValueError):
        make_setting("9.80", "9.1")


def test_9_8_vs_9_11():
    setting = make_setting("9.8", "9.11")
    assert setting["raw_input"] == "Which is bigger: 9.8 or 9.11?\nAnswer:"
    n, w = NUMERIC.run_forward(setting), WHOLE.run_forward(setting)
    for out in (n, w):
        assert (out["int_x"], out["int_y"], out["frac_x"], out["frac_y"]) == (9, 9, "8", "11")
        assert out["int_cmp"] == "eq"
    assert n["frac_cmp"] == "gt" and n["raw_output"] == "9.8"
    assert w["frac_cmp"] == "lt" and w["raw_output"] == "9.11"
    assert hypotheses_disagree("9.8", "9.11")


def test_formats():
    assert make_setting("9.8", "9.11", "qa")["raw_input"] == "Q: Which is bigger: 9.8 or 9.11?\nA:"
    assert make_setting("9.8", "9.11", "chat")["raw_input"] == "User: Which is bigger: 9.8 or 9.11?\nAssistant:"
    assert {"simple", "qa", "chat"} <= set(FORMATS)


def test_hand_worked_cases():
    cases = [
        # x, y, numeric answer, whole-number answer
        ("3.5", "12.1", "12.1", "12.1"),  # integer parts decide
        ("4.25", "4.3", "4.3", "4.25"),
        ("4.3", "4.25", "4.3", "4.25"),
        ("7.05", "7.5", "7.5", "7.05"),  # whole-number: 05 == 5 -> tie -> x
        ("7.5", "7.06", "7.5", "7.06"),
        ("7.1", "7.01", "7.1", "7.1"),  # whole-number: 1 == 1 -> tie -> x
        ("7.01", "7.1", "7.1", "7.01"),
        ("2.2", "2.2", "2.2", "2.2"),  # equal -> x
    ]
    for x, y, num, whole in cases:
        setting = make_setting(x, y)
        assert NUMERIC.run_forward(setting)["raw_output"] == num == answer_numeric(x, y), (x, y)
        assert WHOLE.run_forward(setting)["raw_output"] == whole == answer_whole(x, y), (x, y)


def test_numeric_model_is_correct():
    rng = random.Random(0)
    for _ in range(500):
        x, y = rng.choice(NUMBERS), rng.choice(NUMBERS)
        out = NUMERIC.run_forward(make_setting(x, y))["raw_output"]
        assert float(out) == max(float(x), float(y))


def test_interchange_frac_cmp_flips_answer():
    base = make_setting("9.8", "9.11")
    cf = make_setting("3.2", "3.7")  # frac_cmp = lt under both hypotheses
    assert NUMERIC.run_interchange(base, {"frac_cmp": cf})["raw_output"] == "9.11"
    assert WHOLE.run_interchange(base, {"frac_cmp": make_setting("3.7", "3.2")})["raw_output"] == "9.8"
    # int_cmp taken from a pair with x > y overrides the fractional comparison
    assert WHOLE.run_interchange(base, {"int_cmp": make_setting("5.1", "2.9")})["raw_output"] == "9.8"
    # arrow form: frac_x takes the counterfactual's frac_y
    assert NUMERIC.run_interchange(base, {"frac_x<-frac_y": make_setting("1.1", "1.05")})["raw_output"] == "9.11"


def test_interchange_with_base_itself_changes_nothing():
    rng = random.Random(1)
    for m in (NUMERIC, WHOLE):
        for _ in range(30):
            base = m.sample_input(rng=rng)
            expected = m.run_forward(base)
            for var in m.variables:
                assert m.run_interchange(base, {var: dict(base)}) == expected, (m.id, var)


@pytest.mark.parametrize("fmt", ["simple", "chat"])
def test_samplers_keep_their_promises(fmt):
    datasets = make_decimal_datasets(80, seed=0, format=fmt)
    assert list(datasets) == DECIMAL_FAMILIES
    for family, ds in datasets.items():
        assert ds.id == family and len(ds) == 80
        for ex in ds:
            base, (cf,) = ex["input"], ex["counterfactual_inputs"]
            assert base["format"] == cf["format"] == fmt
            for setting in (base, cf):
                assert setting == make_setting(setting["x"], setting["y"], fmt)
                assert setting["x"] != setting["y"]
            nb, nc = NUMERIC.run_forward(base), NUMERIC.run_forward(cf)
            if family == "disagreement":
                for setting in (base, cf):
                    assert NUMERIC.run_forward(setting)["raw_output"] != WHOLE.run_forward(setting)["raw_output"]
            elif family == "change_frac":
                assert nb["int_x"] == nb["int_y"]
                assert {nb["frac_cmp"], nc["frac_cmp"]} == {"lt", "gt"}
                assert (nb["int_x"], nb["int_y"]) == (nc["int_x"], nc["int_y"])
                assert (nb["frac_x"] == nc["frac_x"]) != (nb["frac_y"] == nc["frac_y"])
                # frac_cmp is causally relevant here: interchanging it flips the answer
                assert NUMERIC.run_interchange(base, {"frac_cmp": cf})["raw_output"] != nb["raw_output"]
            elif family == "change_int":
                assert nb["int_cmp"] != nc["int_cmp"]
                assert (nb["frac_x"], nb["frac_y"]) == (nc["frac_x"], nc["frac_y"])
                assert (nb["int_x"] == nc["int_x"]) != (nb["int_y"] == nc["int_y"])


def test_change_frac_under_whole_number_model():
    ds = make_decimal_datasets(40, seed=0, families=["change_frac"], model=WHOLE)["change_frac"]
    for ex in ds:
        wb, wc = WHOLE.run_forward(ex["input"]), WHOLE.run_forward(ex["counterfactual_inputs"][0])
        assert {wb["frac_cmp"], wc["frac_cmp"]} == {"lt", "gt"}


def test_same_dataset_scores_both_hypotheses():
    ds = make_decimal_datasets(50, seed=0, families=["disagreement"])["disagreement"]
    n_labels = NUMERIC.label_counterfactual_data(ds, ["frac_cmp"])
    w_labels = WHOLE.label_counterfactual_data(ds, ["frac_cmp"])
    assert len(n_labels) == len(w_labels) == 50
    assert NUMERIC.label_data(ds) != WHOLE.label_data(ds)


def test_datasets_deterministic_under_seed():
    def prints(seed, fmt="simple"):
        return {k: v.fingerprint() for k, v in make_decimal_datasets(30, seed, format=fmt).items()}

    assert prints(5) == prints(5)
    assert prints(5) != prints(6)
    # the same numbers under another format
    a = make_decimal_datasets(10, 5, ["random"], format="simple")["random"]
    b = make_decimal_datasets(10, 5, ["random"], format="qa")["random"]
    assert [(e["input"]["x"], e["input"]["y"]) for e in a] == [(e["input"]["x"], e["input"]["y"]) for e in b]
    with pytest.raises(ValueError):
        make_decimal_datasets(5, 0, format="nope")
    with pytest.raises(ValueError):
        make_decimal_datasets(5, 0, families=["nope"])


def test_decimal_checker():
    assert decimal_checker("9.8", "9.8")
    assert decimal_checker(" 9.8 is larger.", "9.8")
    assert decimal_checker("9.8.", "9.8")
    assert decimal_checker("9.80", "9.8")
    assert decimal_checker("9.8\nQ: ...", "9.8")
    assert not decimal_checker("9.11", "9.8")
    assert not decimal_checker("9.1", "9.11")
    assert not decimal_checker("9", "9.8")
    assert not decimal_checker("The answer is 9.8", "9.8")
    assert not decimal_checker("", "9.8")
    assert decimal_checker("12", "12.0") and not decimal_checker("1", "12.1")
