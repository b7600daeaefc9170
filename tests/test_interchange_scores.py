"""compute_interchange_scores on hand-written raw results (torch-free, no network model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from causal import (
    CausalModel,
    CellSpec,
    CounterfactualDataset,
    DatasetRecord,
    InterchangeScores,
    RawResults,
    RawResultsWriter,
    ResultsError,
    ResultsManifest,
    UnitAddress,
    compute_interchange_scores,
    wilson_interval,
)

DIGITS = list(range(10))


def addition_model(with_carry: bool) -> CausalModel:
    """a1 a0 + b1 b0; ``with_carry=False`` is a wrong hypothesis: the tens ignore the ones' carry."""
    c = 1 if with_carry else 0
    return CausalModel(
        ["a1", "a0", "b1", "b0", "carry_0", "s0", "carry_1", "s1", "parity_a", "raw_input", "raw_output"],
        {"a1": DIGITS, "a0": DIGITS, "b1": DIGITS, "b0": DIGITS, "carry_0": [0, 1], "s0": DIGITS,
         "carry_1": [0, 1], "s1": DIGITS, "parity_a": [0, 1], "raw_input": None, "raw_output": None},
        {"a1": [], "a0": [], "b1": [], "b0": [], "carry_0": ["a0", "b0"], "s0": ["a0", "b0"],
         "carry_1": ["a1", "b1", "carry_0"], "s1": ["a1", "b1", "carry_0"], "parity_a": ["a0"],
         "raw_input": ["a1", "a0", "b1", "b0"], "raw_output": ["carry_1", "s1", "s0"]},
        {"a1": lambda: 0, "a0": lambda: 0, "b1": lambda: 0, "b0": lambda: 0,
         "carry_0": lambda a0, b0: int(a0 + b0 >= 10), "s0": lambda a0, b0: (a0 + b0) % 10,
         "carry_1": lambda a1, b1, k: int(a1 + b1 + c * k >= 10), "s1": lambda a1, b1, k: (a1 + b1 + c * k) % 10,
         "parity_a": lambda a0: a0 % 2,
         "raw_input": lambda a1, a0, b1, b0: f"{a1}{a0}+{b1}{b0}=",
         "raw_output": lambda k1, s1, s0: str(100 * k1 + 10 * s1 + s0)},
        id="carry" if with_carry else "no_carry",
    )


CARRY = addition_model(True)
NO_CARRY = addition_model(False)


def setting(a: int, b: int) -> dict:
    return CARRY.new_raw_input({"a1": a // 10, "a0": a % 10, "b1": b // 10, "b0": b % 10})


def make_dataset(pairs, id: str) -> CounterfactualDataset:
    return CounterfactualDataset.from_dict(
        {"input": [setting(*b) for b, _ in pairs], "counterfactual_inputs": [[setting(*c)] for _, c in pairs]}, id=id
    )


# Labels under a carry_0 interchange, by model (worked by hand):
#   hand:  58+67 <- 11+11   carry: "115"  no_carry: "115"   (base outputs: carry "125", no_carry "115")
#          12+13 <- 58+67          "35"             "25"                     "25"             "25"
#          95+05 <- 11+11          "90"             "90"                     "100"            "90"
#          40+30 <- 40+30          "70"             "70"                     "70"             "70"
#   hand2: 19+01 <- 11+11          "10"             "10"                     "20"             "10"
#          23+45 <- 09+09          "78"             "68"                     "68"             "68"
HAND = make_dataset([((58, 67), (11, 11)), ((12, 13), (58, 67)), ((95, 5), (11, 11)), ((40, 30), (40, 30))], "hand")
HAND2 = make_dataset([((19, 1), (11, 11)), ((23, 45), (9, 9))], "hand2")

OUTPUTS = {  # cell -> dataset -> output per example
    "c1": {"hand": ["115", "35", "90", "71"], "hand2": ["10", " 78"]},
    "c2": {"hand": ["125", "25", "100", "70"], "hand2": ["20", "68"]},
}
BASE = {"hand": ["125", "25", "100", "99"], "hand2": ["20", "68"]}


def checker(output: str, expected) -> bool:
    return output.strip() == expected


def write_results(root, datasets=(HAND, HAND2), fingerprints=None) -> RawResults:
    fingerprints = fingerprints or {}
    manifest = ResultsManifest(
        experiment_id="hand_written",
        experiment_type="interchange",
        datasets=[DatasetRecord(dataset_id=d.id, fingerprint=fingerprints.get(d.id, d.fingerprint()), size=len(d))
                  for d in datasets],
        cells=[
            CellSpec(cell_id="c1", units=[UnitAddress(layer=0, component="block_output", position_id="last")]),
            CellSpec(cell_id="c2", units=[UnitAddress(layer=1, component="attention_head", head=3, position_id="op1"),
                                          UnitAddress(layer=1, component="attention_head", head=4, position_id="op1")]),
        ],
        cell_groups=[["c2"], ["c1"]],
        example_batch_size=3,  # "hand" is written in two parts
    )
    writer = RawResultsWriter(root, manifest)

    def row(i, text, **extra):
        return {**extra, "example_index": i, "output_text": text, "output_token_ids": [1], "topk_token_ids": [[1]],
                "topk_logits": [[0.5]]}

    for d in datasets:
        for part in range(manifest.n_parts(d.id)):
            indices = range(3 * part, min(3 * part + 3, len(d)))
            base_rows = [row(i, BASE[d.id][i]) for i in indices]
            cell_rows = [row(i, OUTPUTS[cell][d.id][i], cell_id=cell) for cell in ("c2", "c1") for i in indices]
            writer.write_part(d.id, part, base_rows, cell_rows[::-1])  # order on disk must not matter
    return writer.results()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> RawResults:
    return write_results(tmp_path_factory.mktemp("results"))


def cell_row(table: pd.DataFrame, group: str, cell: str, dataset: str | None = None) -> pd.Series:
    mask = (table["target_variables"] == group) & (table["cell_id"] == cell)
    if dataset is not None:
        mask &= table["dataset_id"] == dataset
    rows = table[mask]
    assert len(rows) == 1
    return rows.iloc[0]


def test_wilson_interval_known_values():
    low, high = wilson_interval(3, 4)
    assert low == pytest.approx(0.30064, abs=1e-4) and high == pytest.approx(0.95441, abs=1e-4)
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 2) == pytest.approx((0.0, z2 / (2 + z2)))
    assert wilson_interval(2, 2) == pytest.approx((2 / (2 + z2), 1.0))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_accuracies_per_cell_and_dataset(results):
    scores = compute_interchange_scores(results, CARRY, [HAND, HAND2], [["carry_0"]], checker)
    table = scores.table
    assert list(table.columns[:11]) == ["target_variables", "dataset_id", "cell_id", "layer", "component", "head",
                                        "position_id", "n_units", "n", "n_correct", "accuracy"]
    assert len(table) == 4
    # rows in (group, dataset, manifest cell) order
    assert list(zip(table["dataset_id"], table["cell_id"])) == [("hand", "c1"), ("hand", "c2"),
                                                                ("hand2", "c1"), ("hand2", "c2")]
    c1 = cell_row(table, "carry_0", "c1", "hand")
    assert (c1["n"], c1["n_correct"], c1["accuracy"]) == (4, 3, 0.75)
    assert c1["ci_low"] == pytest.approx(0.30064, abs=1e-4) and c1["ci_high"] == pytest.approx(0.95441, abs=1e-4)
    assert (c1["layer"], c1["component"], c1["position_id"], c1["n_units"]) == (0, "block_output", "last", 1)
    assert pd.isna(c1["head"])
    c2 = cell_row(table, "carry_0", "c2", "hand")
    assert c2["accuracy"] == 0.25 and c2["head"] == 3 and c2["layer"] == 1 and c2["n_units"] == 2
    assert cell_row(table, "carry_0", "c1", "hand2")["accuracy"] == 1.0
    assert cell_row(table, "carry_0", "c2", "hand2")["accuracy"] == 0.0


def test_averaged_pools_examples(results):
    scores = compute_interchange_scores(results, CARRY, [HAND, HAND2], [["carry_0"]], checker)
    with pytest.warns(DeprecationWarning, match="pooled"):
        averaged = scores.averaged()
    pd.testing.assert_frame_equal(averaged, scores.pooled())
    assert "dataset_id" not in averaged.columns
    c1 = cell_row(averaged, "carry_0", "c1")
    assert (c1["n"], c1["n_correct"]) == (6, 5) and c1["accuracy"] == pytest.approx(5 / 6)
    assert (c1["ci_low"], c1["ci_high"]) == pytest.approx(wilson_interval(5, 6))
    assert cell_row(averaged, "carry_0", "c2")["accuracy"] == pytest.approx(1 / 6)


def test_per_example_and_base_accuracy(results):
    scores = compute_interchange_scores(results, CARRY, {"hand": HAND, "hand2": HAND2}, [["carry_0"]], checker)
    per = scores.per_example
    assert list(per.columns) == ["target_variables", "dataset_id", "cell_id", "example_index", "expected",
                                 "output_text", "correct", "base_label", "informative", "base_correct_on_label"]
    assert len(per) == 12
    hand_c1 = per[(per.dataset_id == "hand") & (per.cell_id == "c1")]
    assert hand_c1["example_index"].tolist() == [0, 1, 2, 3]
    assert hand_c1["expected"].tolist() == ["115", "35", "90", "70"]
    assert hand_c1["correct"].tolist() == [True, True, True, False]
    base = scores.base_accuracy.set_index("dataset_id")
    assert base.loc["hand", "accuracy"] == 0.75 and base.loc["hand", "n"] == 4
    assert base.loc["hand2", "accuracy"] == 1.0
    assert base.loc["hand", "ci_low"] == pytest.approx(0.30064, abs=1e-4)


def test_irrelevant_variable_scores_like_base(results):
    scores = compute_interchange_scores(results, CARRY, [HAND], [["parity_a"]], checker)
    # parity_a changes nothing, so the labels are the base outputs; c2 reproduces them on all 4
    assert cell_row(scores.table, "parity_a", "c2", "hand")["accuracy"] == 1.0


def test_two_causal_models_give_different_accuracies(results):
    with_carry = compute_interchange_scores(results, CARRY, [HAND, HAND2], [["carry_0"]], checker).pooled()
    without = compute_interchange_scores(results, NO_CARRY, [HAND, HAND2], [["carry_0"]], checker)
    assert cell_row(with_carry, "carry_0", "c1")["n_correct"] == 5
    assert cell_row(with_carry, "carry_0", "c2")["n_correct"] == 1
    assert cell_row(without.table, "carry_0", "c1", "hand")["accuracy"] == 0.5
    assert cell_row(without.table, "carry_0", "c2", "hand")["accuracy"] == 0.5
    assert cell_row(without.pooled(), "carry_0", "c1")["n_correct"] == 3
    assert cell_row(without.pooled(), "carry_0", "c2")["n_correct"] == 3
    assert without.base_accuracy.set_index("dataset_id").loc["hand", "n_correct"] == 1


def test_include_pairs(results):
    singles = [["carry_0"], ["s0"], ["parity_a"]]
    scores = compute_interchange_scores(results, CARRY, [HAND], singles, checker, include_pairs=True)
    groups = list(dict.fromkeys(scores.table["target_variables"]))
    assert groups == ["carry_0", "s0", "parity_a", "carry_0+s0", "carry_0+parity_a", "s0+parity_a"]
    assert len(scores.table) == 6 * 2
    # a pair already listed is not added twice; multi-variable groups do not seed pairs
    again = compute_interchange_scores(results, CARRY, [HAND], [["carry_0"], ["s0"], ["carry_0", "s0"], ["a0", "b0"]],
                                       checker, include_pairs=True)
    assert list(dict.fromkeys(again.table["target_variables"])) == ["carry_0", "s0", "carry_0+s0", "a0+b0"]
    # joint group labels: carry_0 and s0 of 11+11 into 58+67 -> "112"
    per = again.per_example
    row = per[(per.target_variables == "carry_0+s0") & (per.cell_id == "c1") & (per.example_index == 0)]
    assert row["expected"].tolist() == ["112"]


def test_arrow_group(results):
    scores = compute_interchange_scores(results, CARRY, [HAND], [["carry_0<-carry_1"]], checker)
    # carry_1 of the counterfactuals: 0, 1, 0, 0 -> labels "115", "35", "90", "70": same as carry_0 here
    assert cell_row(scores.table, "carry_0<-carry_1", "c1", "hand")["accuracy"] == 0.75


def test_only_given_datasets_are_scored(results):
    scores = compute_interchange_scores(str(results.root), CARRY, HAND2, [["carry_0"]], checker)
    assert set(scores.table["dataset_id"]) == {"hand2"}
    assert scores.base_accuracy["dataset_id"].tolist() == ["hand2"]


def test_missing_dataset_error(results):
    stranger = make_dataset([((10, 10), (20, 20))], "stranger")
    with pytest.raises(ValueError, match="'stranger' is not in the results"):
        compute_interchange_scores(results, CARRY, [HAND, stranger], [["carry_0"]], checker)


def test_fingerprint_mismatch_error(tmp_path):
    results = write_results(tmp_path, fingerprints={"hand": "0" * 64})
    with pytest.raises(ValueError, match="'hand' does not match.*fingerprint"):
        compute_interchange_scores(results, CARRY, [HAND, HAND2], [["carry_0"]], checker)
    # a dataset with the same id but different content is caught the same way
    impostor = make_dataset([((11, 11), (22, 22))] * 2, "hand2")
    with pytest.raises(ValueError, match="'hand2' does not match"):
        compute_interchange_scores(results, CARRY, [impostor], [["carry_0"]], checker)


def test_unknown_target_variable(results):
    with pytest.raises(ValueError, match="'carry_9'"):
        compute_interchange_scores(results, CARRY, [HAND], [["carry_9"]], checker)


def test_save_load_and_summary(results, tmp_path):
    scores = compute_interchange_scores(results, CARRY, [HAND, HAND2], [["carry_0"], ["s0"]], checker)
    path = tmp_path / "out" / "scores.json"
    scores.save(path)
    blob = json.loads(path.read_text())
    assert {"table", "pooled", "best_cells", "base_accuracy"} <= set(blob)
    assert len(blob["table"]) == 8 and len(blob["pooled"]) == 4
    c1 = next(r for r in blob["pooled"] if r["target_variables"] == "carry_0" and r["cell_id"] == "c1")
    assert c1["n_correct"] == 5 and c1["head"] is None and c1["n_informative"] == 5 and c1["floor_correct"] == 0
    assert [(r["target_variables"], r["cell_id"], r["located"]) for r in blob["best_cells"]] == [
        ("carry_0", "c1", True), ("s0", "c1", False)]  # s0 moves on no informative pair
    per = pd.read_parquet(tmp_path / "out" / "scores.per_example.parquet")
    assert len(per) == len(scores.per_example) == 24
    loaded = InterchangeScores.load(path)
    pd.testing.assert_frame_equal(loaded.pooled(), scores.pooled(), check_dtype=False)
    pd.testing.assert_frame_equal(loaded.best_cells(), scores.best_cells(), check_dtype=False)
    text = scores.summary(top_k=1)
    carry_block = text.split("carry_0:")[1].split("s0:")[0]
    assert "carried by c1" in carry_block and "IIA 0.833" in carry_block and "c2" not in carry_block
    assert "informative IIA 1.000 (5/5" in carry_block and "floor 0.000" in carry_block
    assert "base (no intervention) on hand: 0.750" in text


def test_non_string_labels(results):
    int_model = CausalModel(CARRY.variables, CARRY.values, CARRY.parents,
                            {**CARRY.mechanisms, "raw_output": lambda k1, s1, s0: 100 * k1 + 10 * s1 + s0})
    seen = []

    def int_checker(output: str, expected) -> bool:
        seen.append(type(expected))
        return output.strip() == str(expected)

    scores = compute_interchange_scores(results, int_model, [HAND, HAND2], [["carry_0"]], int_checker)
    assert set(seen) == {int}
    assert cell_row(scores.pooled(), "carry_0", "c1")["n_correct"] == 5
    assert scores.per_example["expected"].tolist()[:4] == ["115", "35", "90", "70"]


def test_counterfactual_index_comes_from_the_manifest(results):
    scores = compute_interchange_scores(results, CARRY, [HAND, HAND2], [["carry_0"]], checker)
    assert scores.metadata["counterfactual_index"] == 0

def test_scoring_refuses_a_counterfactual_index_the_experiment_did_not_use(results):
    with pytest.raises(ValueError, match="patched from counterfactual input #0"):
        compute_interchange_scores(results, CARRY, [HAND, HAND2], [["carry_0"]], checker, counterfactual_index=1)


def test_writer_refuses_a_non_empty_folder_without_manifest(tmp_path):
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "stray.parquet").write_bytes(b"x")
    with pytest.raises(ResultsError, match="not empty"):
        write_results(tmp_path)


# ---------------------------------------------------------------- floors, informative pairs, best cell
# carry_0 on HAND: labels "115" "35" "90" "70"; the carry model's base labels "125" "25" "100" "70", so
# examples 0-2 are informative and example 3 is not (the network's wrong base output "99" does not matter).
# Base outputs "125" "25" "100" "99" match none of the labels: floor 0/4. HAND2: both pairs informative, floor 0/2.


def test_floor_and_informative_counts_per_dataset(results):
    scores = compute_interchange_scores(results, CARRY, [HAND, HAND2], [["carry_0"]], checker)
    c1 = cell_row(scores.table, "carry_0", "c1", "hand")
    assert (c1["floor_correct"], c1["floor"]) == (0, 0.0)
    assert (c1["floor_ci_low"], c1["floor_ci_high"]) == pytest.approx(wilson_interval(0, 4))
    assert (c1["n_informative"], c1["n_informative_correct"], c1["informative_accuracy"]) == (3, 3, 1.0)
    assert (c1["informative_ci_low"], c1["informative_ci_high"]) == pytest.approx(wilson_interval(3, 3))
    assert bool(c1["above_floor"])
    c2 = cell_row(scores.table, "carry_0", "c2", "hand")  # outputs the base answers: right only where nothing moves
    assert (c2["accuracy"], c2["n_informative"], c2["n_informative_correct"]) == (0.25, 3, 0)
    assert not c2["above_floor"]
    per = scores.per_example
    hand_c1 = per[(per.dataset_id == "hand") & (per.cell_id == "c1")]
    assert hand_c1["informative"].tolist() == [True, True, True, False]
    assert hand_c1["base_label"].tolist() == ["125", "25", "100", "70"]
    assert hand_c1["base_correct_on_label"].tolist() == [False, False, False, False]


def test_a_variable_that_changes_nothing_has_a_high_floor_and_no_cell(results):
    # parity_a never changes the answer: labels = base labels. The network's base outputs hit 3 of 4,
    # so the floor is 0.75 and c2 (which reproduces the base answers) scores IIA 1.0 without any effect.
    scores = compute_interchange_scores(results, CARRY, [HAND], [["parity_a"], ["carry_0"]], checker)
    c2 = cell_row(scores.table, "parity_a", "c2", "hand")
    assert (c2["accuracy"], c2["floor"], c2["n_informative"]) == (1.0, 0.75, 0)
    assert math.isnan(c2["informative_accuracy"]) and not c2["above_floor"]
    per = scores.per_example
    assert per[(per.target_variables == "parity_a")]["base_correct_on_label"].tolist()[:4] == [True, True, True, False]
    best = scores.best_cells().set_index("target_variables")
    assert not best.loc["parity_a", "located"] and scores.location("parity_a") is None
    assert best.loc["carry_0", "located"] and scores.location("carry_0") == "c1"
    assert "no cell carries parity_a" in scores.summary()


def test_floor_uses_the_same_pairs_under_another_hypothesis(results):
    # NO_CARRY labels carry_0 on HAND "115" "25" "90" "70" and base "115" "25" "90" "70": nothing is informative
    # there; base outputs hit "25" (example 1): floor 1/4
    scores = compute_interchange_scores(results, NO_CARRY, [HAND], [["carry_0"]], checker)
    row = cell_row(scores.table, "carry_0", "c1", "hand")
    assert (row["floor_correct"], row["n_informative"]) == (1, 0)


def test_pooled_sums_pairs_and_per_family_breaks_it_down(results):
    scores = compute_interchange_scores(results, CARRY, [HAND, HAND2], [["carry_0"], ["s0"]], checker)
    c1 = cell_row(scores.pooled(), "carry_0", "c1")
    assert (c1["n"], c1["n_correct"], c1["floor_correct"], c1["n_informative"], c1["n_informative_correct"]) == (6, 5, 0, 5, 5)
    # pooled over pairs (5/6), not the mean of the per-dataset accuracies (0.75 and 1.0 -> 0.875)
    assert c1["accuracy"] == pytest.approx(5 / 6)
    assert (c1["floor_ci_low"], c1["floor_ci_high"]) == pytest.approx(wilson_interval(0, 6))
    families = scores.per_family("carry_0", "c1")
    assert families["dataset_id"].tolist() == ["hand", "hand2"]
    assert families["accuracy"].tolist() == [0.75, 1.0] and families["n_informative"].tolist() == [3, 2]
    only = scores.pooled(["hand2"])
    pd.testing.assert_series_equal(
        cell_row(only, "carry_0", "c2")[["n", "n_correct", "accuracy", "informative_accuracy"]],
        cell_row(scores.per_family("carry_0", "c2"), "carry_0", "c2", "hand2")[
            ["n", "n_correct", "accuracy", "informative_accuracy"]], check_names=False)
    everything = scores.per_family()
    assert len(everything) == len(scores.table) == 8
    assert list(zip(everything["target_variables"], everything["cell_id"], everything["dataset_id"]))[:4] == [
        ("carry_0", "c1", "hand"), ("carry_0", "c1", "hand2"), ("carry_0", "c2", "hand"), ("carry_0", "c2", "hand2")]
    with pytest.raises(KeyError, match="'nope'"):
        scores.pooled(["nope"])
    # the best cell can be asked on one family too
    assert scores.best_cells("hand2").set_index("target_variables").loc["carry_0", "cell_id"] == "c1"


def _scores_from_counts(rows: list[dict]) -> InterchangeScores:
    from causal.interchange_scores import TABLE_COLUMNS, _with_scores

    frame = pd.DataFrame([{"target_variables": "v", "dataset_id": "d", "component": "block_output", "head": None,
                           "n_units": 1, "floor_correct": 0, **r} for r in rows])
    frame["n_correct"] = frame["n_informative_correct"]
    table = _with_scores(frame)[TABLE_COLUMNS]
    return InterchangeScores(table, pd.DataFrame(), pd.DataFrame(columns=["dataset_id"]))


def test_best_cell_rule_and_tie_breaks():
    base = {"n": 8, "n_informative": 4, "position_id": "p"}
    # a and b tie on informative IIA (0.75); b has more informative pairs, hence the higher lower CI bound
    scores = _scores_from_counts([
        {**base, "cell_id": "a", "layer": 0, "n_informative_correct": 3},
        {**base, "cell_id": "b", "layer": 3, "n_informative": 8, "n": 8, "n_informative_correct": 6},
    ])
    assert scores.ranked()["cell_id"].tolist() == ["b", "a"]
    assert scores.location("v") == "b"
    # identical scores: the earlier layer wins, then manifest order
    scores = _scores_from_counts([
        {**base, "cell_id": "late", "layer": 2, "n_informative_correct": 3},
        {**base, "cell_id": "first", "layer": 1, "n_informative_correct": 3},
        {**base, "cell_id": "second", "layer": 1, "n_informative_correct": 3},
    ])
    assert scores.ranked()["cell_id"].tolist() == ["first", "second", "late"]
    assert scores.best(top_k=2)["cell_id"].tolist() == ["first", "second"]
    # the top informative IIA sits on its floor: the next cell that clears its own floor is the location
    scores = _scores_from_counts([
        {**base, "cell_id": "high_floor", "layer": 0, "n_informative_correct": 4, "floor_correct": 8},
        {**base, "cell_id": "clears", "layer": 1, "n_informative_correct": 3},
    ])
    best = scores.best_cells().iloc[0]
    assert (best["cell_id"], best["located"]) == ("clears", True)
    # an informative IIA under the floor's upper CI bound is no location, however it ranks
    scores = _scores_from_counts([{**base, "cell_id": "x", "layer": 0, "n_informative_correct": 1, "floor_correct": 1}])
    row = scores.table.iloc[0]
    assert row["informative_accuracy"] == 0.25 and row["floor_ci_high"] > 0.25 and not row["above_floor"]
    best = scores.best_cells().iloc[0]
    assert (best["cell_id"], best["located"]) == ("x", False) and scores.location("v") is None
