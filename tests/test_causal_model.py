"""CausalModel: forward runs, interchanges, sampling, validation, drawing (torch-free)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from causal import CausalModel, CounterfactualDataset

DIGITS = list(range(10))
TEMPLATES = ["{a}+{b}=", "Q: {a} plus {b}? A:"]


def make_addition_model(with_carry: bool = True, id: str = "addition") -> CausalModel:
    """Two 2-digit addends a = a1 a0, b = b1 b0. ``with_carry=False``: the tens ignore the ones' carry."""
    variables = ["template", "a1", "a0", "b1", "b0", "carry_0", "s0", "carry_1", "s1", "parity_a",
                 "raw_input", "raw_output"]
    values = {
        "template": TEMPLATES, "a1": DIGITS, "a0": DIGITS, "b1": DIGITS, "b0": DIGITS,
        "carry_0": [0, 1], "s0": DIGITS, "carry_1": [0, 1], "s1": DIGITS, "parity_a": [0, 1],
        "raw_input": None, "raw_output": None,
    }
    parents = {
        "template": [], "a1": [], "a0": [], "b1": [], "b0": [],
        "carry_0": ["a0", "b0"], "s0": ["a0", "b0"],
        "carry_1": ["a1", "b1", "carry_0"], "s1": ["a1", "b1", "carry_0"],
        "parity_a": ["a0"],
        "raw_input": ["template", "a1", "a0", "b1", "b0"],
        "raw_output": ["carry_1", "s1", "s0"],
    }
    c = 1 if with_carry else 0
    mechanisms = {
        "template": lambda: TEMPLATES[0], "a1": lambda: 0, "a0": lambda: 0, "b1": lambda: 0, "b0": lambda: 0,
        "carry_0": lambda a0, b0: int(a0 + b0 >= 10),
        "s0": lambda a0, b0: (a0 + b0) % 10,
        "carry_1": lambda a1, b1, k: int(a1 + b1 + c * k >= 10),
        "s1": lambda a1, b1, k: (a1 + b1 + c * k) % 10,
        "parity_a": lambda a0: a0 % 2,
        "raw_input": lambda t, a1, a0, b1, b0: t.format(a=f"{a1}{a0}", b=f"{b1}{b0}"),
        "raw_output": lambda k1, s1, s0: str(100 * k1 + 10 * s1 + s0),
    }
    return CausalModel(variables, values, parents, mechanisms, id=id)


def numbers(a: int, b: int, template: str = TEMPLATES[0]) -> dict:
    return {"template": template, "a1": a // 10, "a0": a % 10, "b1": b // 10, "b0": b % 10}


@pytest.fixture(scope="module")
def model() -> CausalModel:
    return make_addition_model()


# ---------------------------------------------------------------- structure


def test_structure(model):
    assert model.inputs == ["template", "a1", "a0", "b1", "b0"]
    assert model.outputs == ["parity_a", "raw_input", "raw_output"]
    assert model.children["a0"] == ["carry_0", "s0", "parity_a", "raw_input"]
    order = model.topological_order
    assert sorted(order) == sorted(model.variables)
    for var in model.variables:
        for parent in model.parents[var]:
            assert order.index(parent) < order.index(var)
    assert model.depths()["raw_output"] == 3


def test_forward_known_inputs(model):
    run = model.run_forward(numbers(58, 67))
    assert run["carry_0"] == 1 and run["s0"] == 5
    assert run["carry_1"] == 1 and run["s1"] == 2
    assert run["raw_output"] == "125"
    assert run["raw_input"] == "58+67="
    assert list(run) == model.variables
    assert model.run_forward(numbers(12, 13, TEMPLATES[1]))["raw_input"] == "Q: 12 plus 13? A:"
    assert model.run_forward(numbers(12, 13))["raw_output"] == "25"


def test_forward_defaults_and_clamping(model):
    run = model.run_forward({})  # all inputs at their defaults: 00 + 00
    assert run["raw_output"] == "0" and run["raw_input"] == "00+00="
    # clamping an intermediate variable
    assert model.run_forward({**numbers(12, 13), "carry_0": 1})["raw_output"] == "35"
    assert model.run_forward({**numbers(12, 13), "s0": 9})["raw_output"] == "29"


# ---------------------------------------------------------------- interchange


def test_interchange_hand_worked(model):
    base, cf = numbers(58, 67), numbers(11, 11)
    # carry_0 taken from 11+11 (no carry): tens become 5+6+0 = 11 -> "115"
    assert model.run_interchange(base, {"carry_0": cf})["raw_output"] == "115"
    # ones digit of the sum from 11+11 (2): "122"
    assert model.run_interchange(base, {"s0": cf})["raw_output"] == "122"
    # both carry_0 and s0 from 11+11: "112"
    out = model.run_interchange(base, {"carry_0": cf, "s0": cf})
    assert out["raw_output"] == "112" and out["carry_0"] == 0 and out["s0"] == 2
    # input variable interchange: a0 from 11+11 -> 51 + 67 = 118
    assert model.run_interchange(base, {"a0": cf})["raw_output"] == "118"
    # base prompt is kept when an input is interchanged? raw_input is recomputed unless clamped
    assert model.run_interchange(model.new_raw_input(base), {"a0": cf})["raw_input"] == "58+67="


def test_interchange_arrow_form(model):
    base, cf = numbers(12, 13), numbers(58, 67)
    # base carry_0 <- counterfactual carry_1 (= 1): 12+13 with a carry into the tens -> "35"
    assert model.run_interchange(base, {"carry_0<-carry_1": cf})["raw_output"] == "35"
    # base a0 <- counterfactual b0 (7): 17 + 13 = 30
    out = model.run_interchange(base, {"a0<-b0": cf})
    assert out["a0"] == 7 and out["raw_output"] == "30"
    # spaces around the arrow are tolerated
    assert model.run_interchange(base, {"a0 <- b0": cf})["raw_output"] == "30"
    # counterfactual value outside the base variable's domain: s0 = 5 is not a carry
    with pytest.raises(ValueError, match="carry_0"):
        model.run_interchange(base, {"carry_0<-s0": cf})
    with pytest.raises(ValueError, match="both set variable 'a0'"):
        model.run_interchange(base, {"a0": cf, "a0<-b0": cf})
    with pytest.raises(ValueError, match="nope"):
        model.run_interchange(base, {"a0<-nope": cf})


inputs_strategy = st.builds(
    lambda t, a, b: numbers(a, b, t),
    st.sampled_from(TEMPLATES), st.integers(0, 99), st.integers(0, 99),
)
subsets = st.lists(
    st.sampled_from(["a1", "a0", "b1", "b0", "carry_0", "s0", "carry_1", "s1", "parity_a"]), unique=True
)


@settings(max_examples=60, deadline=None, database=None)
@given(base=inputs_strategy, variables=subsets)
def test_interchange_with_itself_changes_nothing(model, base, variables):
    assert model.run_interchange(base, {v: base for v in variables}) == model.run_forward(base)


@settings(max_examples=60, deadline=None, database=None)
@given(base=inputs_strategy, cf=inputs_strategy)
def test_interchange_of_irrelevant_variable_changes_nothing(model, base, cf):
    # nothing depends on parity_a
    out = model.run_interchange(base, {"parity_a": cf})
    expected = model.run_forward(base)
    assert out["raw_output"] == expected["raw_output"]
    assert {k: v for k, v in out.items() if k != "parity_a"} == {
        k: v for k, v in expected.items() if k != "parity_a"
    }


@settings(max_examples=60, deadline=None, database=None)
@given(base=inputs_strategy, cf=inputs_strategy)
def test_interchange_all_inputs_gives_counterfactual_output(model, base, cf):
    keys = ["a1", "a0", "b1", "b0"]
    assert model.run_interchange(base, {k: cf for k in keys})["raw_output"] == model.run_forward(cf)["raw_output"]


# ---------------------------------------------------------------- validation


def _spec():
    return dict(
        variables=["x", "y", "z"],
        values={"x": [0, 1], "y": [0, 1], "z": [0, 1, 2]},
        parents={"x": [], "y": ["x"], "z": ["x", "y"]},
        mechanisms={"x": lambda: 0, "y": lambda x: x, "z": lambda x, y: x + y},
    )


def test_valid_spec_builds():
    m = CausalModel(**_spec())
    assert m.run_forward({"x": 1}) == {"x": 1, "y": 1, "z": 2}


def test_cycle_names_variables():
    spec = _spec()
    spec["variables"].append("w")
    spec["values"]["w"] = [0]
    spec["parents"].update(y=["x", "w"], w=["z"])
    spec["mechanisms"].update(y=lambda x, w: x, w=lambda z: 0)
    with pytest.raises(ValueError, match="cycle") as info:
        CausalModel(**spec)
    message = str(info.value)
    for var in ("y", "z", "w"):
        assert var in message
    assert "x ->" not in message  # x is not on the cycle


def test_self_loop_is_a_cycle():
    spec = _spec()
    spec["parents"]["y"] = ["y"]
    with pytest.raises(ValueError, match=r"cycle: y -> y"):
        CausalModel(**spec)


def test_unknown_parent():
    spec = _spec()
    spec["parents"]["z"] = ["x", "q"]
    with pytest.raises(ValueError, match=r"unknown parent 'q' of variable 'z'"):
        CausalModel(**spec)


@pytest.mark.parametrize("mapping", ["values", "parents", "mechanisms"])
def test_missing_variable(mapping):
    spec = _spec()
    del spec[mapping]["z"]
    with pytest.raises(ValueError, match=rf"\['z'\] missing from {mapping}"):
        CausalModel(**spec)


@pytest.mark.parametrize("mapping", ["values", "parents", "mechanisms"])
def test_extra_key(mapping):
    spec = _spec()
    spec[mapping]["ghost"] = spec[mapping]["x"]
    with pytest.raises(ValueError, match=rf"{mapping} has key\(s\) \['ghost'\]"):
        CausalModel(**spec)


@pytest.mark.parametrize(
    "var,mechanism",
    [("z", lambda x: x), ("z", lambda x, y, w: x), ("x", lambda a: 0), ("y", lambda: 0), ("y", lambda x, *, k: x)],
)
def test_arity_mismatch(var, mechanism):
    spec = _spec()
    spec["mechanisms"][var] = mechanism
    with pytest.raises(ValueError, match=rf"mechanism of variable '{var}'"):
        CausalModel(**spec)


def test_arity_accepts_varargs_and_defaults():
    spec = _spec()
    spec["mechanisms"]["z"] = lambda *args: sum(args)
    spec["mechanisms"]["y"] = lambda x, extra=0: x + extra
    spec["mechanisms"]["x"] = lambda *args: 1
    assert CausalModel(**spec).run_forward({})["z"] == 2


def test_out_of_domain_mechanism_output():
    spec = _spec()
    spec["mechanisms"]["z"] = lambda x, y: 7
    m = CausalModel(**spec)
    with pytest.raises(ValueError, match=r"7 for variable 'z'"):
        m.run_forward({})


def test_unknown_intervention_variable(model):
    with pytest.raises(ValueError, match="'nope'"):
        model.run_forward({"nope": 1})
    with pytest.raises(ValueError, match="'nope'"):
        model.run_interchange(numbers(1, 2), {"nope": numbers(3, 4)})


def test_out_of_domain_intervention_value(model):
    with pytest.raises(ValueError, match=r"2 for variable 'carry_0'"):
        model.run_forward({"carry_0": 2})
    with pytest.raises(ValueError, match=r"12 for variable 'a0'"):
        model.run_forward({"a0": 12})
    with pytest.raises(ValueError, match="'template'"):
        model.run_forward({"template": "unknown {a}{b}"})
    # free-domain variables take anything
    assert model.run_forward({"raw_input": "anything"})["raw_input"] == "anything"


def test_bad_domain_type():
    spec = _spec()
    spec["values"]["z"] = {0, 1, 2}
    with pytest.raises(ValueError, match="values\\['z'\\] is a set"):
        CausalModel(**spec)


# ---------------------------------------------------------------- sampling


def test_sample_input_contents_and_filter(model):
    sample = model.sample_input(rng=3)
    assert set(sample) == set(model.inputs) | {"raw_input"}
    assert sample["raw_input"] == model.run_forward(sample)["raw_input"]
    has_carry = model.sample_input(filter=lambda s: model.run_forward(s)["carry_0"] == 1, rng=4)
    assert has_carry["a0"] + has_carry["b0"] >= 10
    with pytest.raises(RuntimeError, match="filter"):
        model.sample_input(filter=lambda s: False, rng=0)


def test_sample_input_determinism(model):
    first = [model.sample_input(rng=random.Random(11)) for _ in range(3)]
    rng = random.Random(11)
    again = model.sample_input(rng=rng)
    assert first[0] == again
    assert model.sample_input(rng=7) == model.sample_input(rng=7)
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [model.sample_input(rng=rng_a) for _ in range(20)] == [model.sample_input(rng=rng_b) for _ in range(20)]
    random.seed(123)
    one = [model.sample_input() for _ in range(5)]
    random.seed(123)
    assert [model.sample_input() for _ in range(5)] == one
    # the samples actually vary
    assert len({model.sample_input(rng=rng_a)["raw_input"] for _ in range(30)}) > 10


def test_sample_input_free_inputs_take_default():
    m = CausalModel(
        ["name", "n", "raw_input"],
        {"name": None, "n": [1, 2, 3], "raw_input": None},
        {"name": [], "n": [], "raw_input": ["name", "n"]},
        {"name": lambda: "Ann", "n": lambda: 1, "raw_input": lambda name, n: f"{name} has {n}"},
    )
    sample = m.sample_input(rng=0)
    assert sample["name"] == "Ann" and sample["n"] in (1, 2, 3)
    assert sample["raw_input"] == f"Ann has {sample['n']}"


def test_sample_intervention(model):
    rng = random.Random(0)
    for _ in range(30):
        intervention = model.sample_intervention(rng=rng)
        assert intervention
        for var, value in intervention.items():
            assert var in {"carry_0", "s0", "carry_1", "s1", "parity_a"}
            assert value in model.values[var]
        model.run_forward({**numbers(1, 2), **intervention})
    only_carry = model.sample_intervention(filter=lambda i: set(i) == {"carry_0"}, rng=1)
    assert set(only_carry) == {"carry_0"}
    assert model.sample_intervention(rng=9) == model.sample_intervention(rng=9)


def test_new_raw_input(model):
    setting = model.sample_input(rng=1)
    edited = {**setting, "a1": (setting["a1"] + 1) % 10}
    fixed = model.new_raw_input(edited)
    assert fixed["raw_input"] == model.run_forward(numbers(10 * edited["a1"] + edited["a0"],
                                                           10 * edited["b1"] + edited["b0"],
                                                           edited["template"]))["raw_input"]
    assert edited["raw_input"] == setting["raw_input"]  # input dict not modified
    assert {k: v for k, v in fixed.items() if k != "raw_input"} == {k: v for k, v in edited.items() if k != "raw_input"}


# ---------------------------------------------------------------- labels


def _hand_dataset(model) -> CounterfactualDataset:
    pairs = [((58, 67), (11, 11)), ((12, 13), (58, 67)), ((95, 5), (11, 11)), ((40, 30), (40, 30))]
    return CounterfactualDataset.from_dict(
        {
            "input": [model.new_raw_input(numbers(*b)) for b, _ in pairs],
            "counterfactual_inputs": [[model.new_raw_input(numbers(*c))] for _, c in pairs],
        },
        id="hand",
    )


def test_label_counterfactual_data(model):
    data = _hand_dataset(model)
    assert model.label_counterfactual_data(data, ["carry_0"]) == ["115", "35", "90", "70"]
    assert model.label_counterfactual_data(data, ["parity_a"]) == ["125", "25", "100", "70"]
    # carry_1 of 11+11 is 0, of 58+67 is 1, of 40+30 is 0
    assert model.label_counterfactual_data(data, ["carry_0<-carry_1"]) == ["115", "35", "90", "70"]
    assert model.label_counterfactual_data(data, ["s0<-b1"]) == ["121", "26", "101", "73"]
    assert model.label_data(data) == ["125", "25", "100", "70"]
    with pytest.raises(IndexError, match="counterfactual_index=1"):
        model.label_counterfactual_data(data, ["carry_0"], counterfactual_index=1)


def test_can_distinguish_and_distinguishability(model):
    data = _hand_dataset(model)
    assert model.can_distinguish_with_dataset(data, ["carry_0"], None) == {"count": 3, "proportion": 0.75, "total": 4}
    assert model.can_distinguish_with_dataset(data, ["parity_a"], None)["count"] == 0
    # example 3 is its own counterfactual, so every interchange gives "70" there
    assert model.can_distinguish_with_dataset(data, ["carry_0"], ["s0"]) == {"count": 3, "proportion": 0.75, "total": 4}
    text = model.distinguishability(data, [["carry_0"], ["parity_a"]])
    assert "carry_0" in text and "parity_a" in text and "(none)" in text
    carry_row = next(line for line in text.splitlines() if line.startswith("carry_0"))
    assert carry_row.split()[1:] == ["0.00", "0.75", "0.75"]


# ---------------------------------------------------------------- drawing


def test_display_structure_writes_png(model, tmp_path):
    path = tmp_path / "graph.png"
    fig = model.display_structure(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig is not None
    assert "a0" in model.print_structure()


def test_structured_values_are_validated_and_input_variables_interchange_directly():
    from causal import StructuredValues

    model = CausalModel(
        ["a", "b", "pair", "raw_output"],
        {"a": list(range(3)), "b": list(range(3)),
         "pair": StructuredValues(lambda v: isinstance(v, tuple) and len(v) == 2, "2-tuples"), "raw_output": None},
        {"a": [], "b": [], "pair": ["a", "b"], "raw_output": ["pair"]},
        {"a": lambda: 0, "b": lambda: 0, "pair": lambda a, b: (a, b), "raw_output": lambda p: str(p[0] + p[1])},
    )
    # interchanging the input variable a: the base's own a is overridden, descendants recomputed
    run = model.run_interchange({"a": 1, "b": 2}, {"a": {"a": 2, "b": 0}})
    assert run["a"] == 2 and run["pair"] == (2, 2) and run["raw_output"] == "4"
    assert not model.is_finite("pair")
    with pytest.raises(ValueError, match="outside its domain 2-tuples"):
        model.run_forward({"a": 1, "b": 1, "pair": [1, 2]})
    broken = CausalModel(model.variables, {**model.values, "pair": StructuredValues(lambda v: isinstance(v, tuple), "tuples")},
                         model.parents, {**model.mechanisms, "pair": lambda a, b: [a, b]})
    with pytest.raises(ValueError, match="mechanism output"):
        broken.run_forward({"a": 1, "b": 1})
