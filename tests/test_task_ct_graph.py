"""Continuous-thought positions task: step chain through CT slots, assignments, samplers, checker."""

from __future__ import annotations

import random

import pytest

from tasks.ct_positions.causal_models import (
    CT_SLOTS,
    build_ct_model,
    default_assignment,
    in_range,
    input_vars,
    make_setting,
    reader_slot,
    slot_carrying,
    true_steps,
)
from tasks.ct_positions.checker import ct_checker
from tasks.ct_positions.counterfactuals import CT_FAMILIES, make_ct_datasets


def test_default_assignments():
    assert CT_SLOTS == ["ct_0", "ct_1", "ct_2", "ct_3", "ct_4", "ct_5"]
    assert list(default_assignment(2).values()) == ["step_1", "step_1", "step_2", "step_2", "step_2", "step_2"]
    assert list(default_assignment(3).values()) == ["step_1", "step_1", "step_2", "step_2", "step_3", "step_3"]
    assert list(default_assignment(4).values()) == ["step_1", "step_2", "step_3", "step_4", "step_4", "step_4"]
    m = build_ct_model(3)
    assert m.id == "ct_3ops_112233"
    assert slot_carrying(m, "step_1") == ["ct_0", "ct_1"]
    assert slot_carrying(m, "step_3") == ["ct_4", "ct_5"]
    assert m.parents["step_2"] == ["ct_1", "op_2", "arg_2"]
    assert m.parents["step_3"] == ["ct_3", "op_3", "arg_3"]
    assert m.parents["answer"] == ["ct_5"]
    assert [reader_slot(m, f"step_{i}") for i in (1, 2, 3)] == ["ct_1", "ct_3", "ct_5"]
    assert set(m.inputs) == set(input_vars(3))
    m4 = build_ct_model(4)
    assert m4.parents["step_2"] == ["ct_0", "op_2", "arg_2"] and m4.parents["answer"] == ["ct_5"]


def test_hand_worked_examples():
    # 2 ops: 3 + 4 = 7, 7 - 2 = 5
    s2 = make_setting(3, ["add", "sub"], [4, 2])
    assert s2["raw_input"] == (
        "Tom has 3 apples. He buys 4 more, then gives away 2. How many apples does he have now? Answer:"
    )
    out = build_ct_model(2).run_forward(s2)
    assert (out["step_1"], out["step_2"], out["answer"], out["raw_output"]) == (7, 5, 5, "5")
    assert [out[c] for c in CT_SLOTS] == [7, 7, 5, 5, 5, 5]
    # 3 ops: (3 + 4 - 2) * 2 = 10
    s3 = make_setting(3, ["add", "sub", "mul"], [4, 2, 2])
    assert "then doubles them." in s3["raw_input"]
    out = build_ct_model(3).run_forward(s3)
    assert [out[f"step_{i}"] for i in (1, 2, 3)] == [7, 5, 10] and out["raw_output"] == "10"
    assert [out[c] for c in CT_SLOTS] == [7, 7, 5, 5, 10, 10]
    # 4 ops: ((9 - 4) * 3 - 1) * 2 = 28
    s4 = make_setting(9, ["sub", "mul", "sub", "mul"], [4, 3, 1, 2])
    out = build_ct_model(4).run_forward(s4)
    assert [out[f"step_{i}"] for i in (1, 2, 3, 4)] == [5, 15, 14, 28] and out["raw_output"] == "28"
    assert [out[c] for c in CT_SLOTS] == [5, 15, 14, 28, 28, 28]
    assert build_ct_model(3).run_forward()["raw_output"] == "10"  # root defaults = s3


def test_forward_matches_arithmetic():
    rng = random.Random(0)
    for n in (2, 3, 4):
        m = build_ct_model(n)
        for _ in range(100):
            setting = m.sample_input(rng=rng)
            out = m.run_forward(setting)
            assert out["answer"] == true_steps(setting, n)[-1] % 100
            assert [out[f"step_{i}"] for i in range(1, n + 1)] == [v % 100 for v in true_steps(setting, n)]


def test_mod_100_keeps_values_in_domain():
    m = build_ct_model(2)
    s = make_setting(1, ["sub", "add"], [4, 1])  # 1 - 4 = -3 -> 97; 97 + 1 = 98
    out = m.run_forward(s)
    assert (out["step_1"], out["answer"]) == (97, 98)
    assert not in_range(s, 2)
    out = m.run_forward({**make_setting(3, ["add", "add"], [4, 3]), "ct_1": 99})
    assert out["answer"] == 2  # 99 + 3 = 102 -> 2


def test_patching_slots():
    m = build_ct_model(3)  # ct_1 -> step_2, ct_3 -> step_3, ct_5 -> answer
    base = make_setting(3, ["add", "sub", "mul"], [4, 2, 2])  # steps 7, 5, 10
    cf = make_setting(8, ["add", "add", "add"], [1, 1, 1])  # steps 9, 10, 11
    assert m.run_forward(base)["raw_output"] == "10"
    # the slot read by the answer carries the final step: patching it changes the answer
    assert m.run_interchange(base, {"ct_5": cf})["raw_output"] == "11"
    # slots nobody reads change nothing
    for slot in ("ct_0", "ct_2", "ct_4"):
        assert m.run_interchange(base, {slot: cf})["raw_output"] == "10", slot
    # reader slots of earlier steps matter through the chain
    assert m.run_interchange(base, {"ct_1": cf})["raw_output"] == "14"  # (9 - 2) * 2
    assert m.run_interchange(base, {"ct_3": cf})["raw_output"] == "20"  # 10 * 2
    # arrow form: ct_5 takes the counterfactual's step_1
    assert m.run_interchange(base, {"ct_5<-step_1": cf})["raw_output"] == "9"


def test_custom_and_partial_assignment():
    assignment = {"ct_0": "step_1", "ct_2": "step_2", "ct_4": "step_3"}  # ct_1, ct_3, ct_5 idle
    m = build_ct_model(3, assignment)
    assert m.id == "ct_3ops_1x2x3x"
    assert m.parents["step_2"] == ["ct_0", "op_2", "arg_2"]
    assert m.parents["answer"] == ["ct_4"]
    assert slot_carrying(m, "step_3") == ["ct_1", "ct_3", "ct_4", "ct_5"]
    assert reader_slot(m, "step_3") == "ct_4"
    base = make_setting(3, ["add", "sub", "mul"], [4, 2, 2])
    cf = make_setting(8, ["add", "add", "add"], [1, 1, 1])
    assert m.run_interchange(base, {"ct_4": cf})["raw_output"] == "11"
    for slot in ("ct_1", "ct_3", "ct_5"):
        assert m.run_interchange(base, {slot: cf})["raw_output"] == "10"
    # late slots may carry an early step: the graph stays acyclic
    m2 = build_ct_model(2, {"ct_5": "step_1", "ct_0": "step_2"})
    assert m2.parents["step_2"] == ["ct_5", "op_2", "arg_2"] and m2.parents["answer"] == ["ct_0"]
    assert m2.run_forward(make_setting(3, ["add", "sub"], [4, 2]))["raw_output"] == "5"


def test_assignment_validation():
    with pytest.raises(ValueError, match="unknown CT slot"):
        build_ct_model(3, {"ct_6": "step_1", "ct_0": "step_2", "ct_1": "step_3"})
    with pytest.raises(ValueError, match="unknown step"):
        build_ct_model(3, {"ct_0": "step_1", "ct_1": "step_2", "ct_2": "step_4"})
    with pytest.raises(ValueError, match="unknown step"):
        build_ct_model(2, {"ct_0": "step_1", "ct_1": "step_2", "ct_2": "start"})
    with pytest.raises(ValueError, match="carried by no CT slot"):
        build_ct_model(3, {"ct_0": "step_1", "ct_1": "step_3"})
    with pytest.raises(ValueError):
        build_ct_model(5)
    with pytest.raises(ValueError):
        build_ct_model(1)


def test_interchange_with_base_itself_changes_nothing():
    rng = random.Random(1)
    models = [build_ct_model(n) for n in (2, 3, 4)]
    models.append(build_ct_model(3, {"ct_0": "step_1", "ct_2": "step_2", "ct_4": "step_3"}))
    for m in models:
        for _ in range(10):
            base = m.sample_input(rng=rng)
            expected = m.run_forward(base)
            for var in m.variables:
                assert m.run_interchange(base, {var: dict(base)}) == expected, (m.id, var)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_samplers_keep_their_promises(n):
    datasets = make_ct_datasets(n, 50, seed=0)
    assert list(datasets) == CT_FAMILIES(n) == ["random", *[f"change_step_{i}" for i in range(1, n + 1)]]
    keys = {*input_vars(n), "raw_input"}
    for family, ds in datasets.items():
        assert ds.id == family and len(ds) == 50
        for ex in ds:
            base, (cf,) = ex["input"], ex["counterfactual_inputs"]
            for setting in (base, cf):
                assert set(setting) == keys
                assert in_range(setting, n)
                ops = [setting[f"op_{i}"] for i in range(1, n + 1)]
                args = [setting[f"arg_{i}"] for i in range(1, n + 1)]
                assert setting == make_setting(setting["start"], ops, args)
            if family.startswith("change_step_"):
                i = int(family.rsplit("_", 1)[1])
                changed = [v for v in input_vars(n) if base[v] != cf[v]]
                assert len(changed) == 1
                assert changed[0] == "start" or int(changed[0].split("_")[1]) <= i
                assert true_steps(base, n)[i - 1] != true_steps(cf, n)[i - 1]


def test_patching_final_reader_on_change_step_data():
    n = 3
    m = build_ct_model(n)
    ds = make_ct_datasets(n, 40, seed=1, families=[f"change_step_{n}"])[f"change_step_{n}"]
    labels = m.label_counterfactual_data(ds, ["ct_5"])
    for ex, label in zip(ds, labels):
        assert label == m.run_forward(ex["counterfactual_inputs"][0])["raw_output"]
        assert label != m.run_forward(ex["input"])["raw_output"]
    assert m.label_counterfactual_data(ds, ["ct_4"]) == m.label_data(ds)


def test_datasets_deterministic_under_seed():
    def prints(seed):
        return {k: v.fingerprint() for k, v in make_ct_datasets(3, 30, seed).items()}

    assert prints(4) == prints(4)
    assert prints(4) != prints(5)
    with pytest.raises(ValueError):
        make_ct_datasets(3, 5, 0, families=["change_step_4"])


def test_ct_checker():
    assert ct_checker("10", 10)
    assert ct_checker(" 10 apples", "10")
    assert ct_checker("10\nQuestion", 10)
    assert ct_checker("10.", 10)
    assert not ct_checker("1", 10)
    assert not ct_checker("100", 10)
    assert not ct_checker("He has 10", 10)
    assert not ct_checker("", 10)
