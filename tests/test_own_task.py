"""The example of a user's own task (demos/own_task/ones_and_tens): a folder of declarations that the standard
steps run; step 3 scores each hypothesis on its own variables; the addition positions need no template variable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from experiments.steps import score as step3
from experiments.task import exact_match, get_task

FOLDER = Path(__file__).resolve().parents[1] / "demos" / "own_task" / "ones_and_tens"


@pytest.fixture
def own_task(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    return get_task(str(FOLDER))


def code_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#"))


def test_the_example_is_a_short_folder_of_declarations(own_task):
    assert sum(code_lines(p) for p in FOLDER.glob("*.py")) < 90  # the README quotes the count
    assert own_task.name == "ones_and_tens" and own_task.checker is exact_match
    settings = own_task.settings()
    models = own_task.causal_models(settings)
    assert list(models) == ["columns", "whole_numbers"]
    assert own_task.default_targets(settings, None) == [["ones_sum"], ["tens_sum"], ["raw_output"]]  # no raw_input
    assert (own_task.organism / "config.json").exists()
    datasets = own_task.make_datasets(settings, own_task.families(settings), 16, 0)
    assert list(datasets) == ["random", "carry_differs"]
    again = own_task.make_datasets(settings, ["carry_differs"], 16, 0)["carry_differs"]
    assert again.fingerprint() == datasets["carry_differs"].fingerprint()  # each family has its own generator
    for family, dataset in datasets.items():
        for example in dataset:
            base, source = example["input"], example["counterfactual_inputs"][0]
            assert all(base[d] != source[d] for d in ("a1", "a0", "b1", "b0"))
            assert base["raw_input"] == f"{base['a1']}{base['a0']}+{base['b1']}{base['b0']}="
            if family == "carry_differs":
                assert (base["a0"] + base["b0"] >= 10) != (source["a0"] + source["b0"] >= 10)
        for model in models.values():  # both hypotheses label the same dataset, and agree on the base runs
            assert model.label_data(dataset) == [str(int(e["input"]["raw_input"][:2]) + int(e["input"]["raw_input"][3:5]))
                                                 for e in dataset]


def test_each_hypothesis_is_scored_on_its_own_variables(own_task):
    settings = own_task.settings()
    models = own_task.causal_models(settings)
    targets = step3.hypothesis_targets(own_task, settings, models, None)
    assert targets == {"columns": [["ones_sum"], ["tens_sum"], ["raw_output"]],
                       "whole_numbers": [["a"], ["b"], ["raw_output"]]}
    chosen = step3.hypothesis_targets(own_task, settings, models, [["a"], ["ones_sum"]])
    assert chosen == {"columns": [["ones_sum"]], "whole_numbers": [["a"]]}
    only_whole = step3.hypothesis_targets(own_task, settings, {"whole_numbers": models["whole_numbers"]}, None)
    assert only_whole == {"whole_numbers": [["a"], ["b"], ["raw_output"]]}
    with pytest.raises(ValueError, match=r"\['carry_9'\] are not variables of the main hypothesis 'columns' nor of "
                                         r"'whole_numbers'"):
        step3.hypothesis_targets(own_task, settings, models, [["carry_9"]])


def test_a_competitor_with_the_same_variables_keeps_the_main_targets():
    addition = get_task("general_addition")
    settings = addition.settings()
    targets = step3.hypothesis_targets(addition, settings, addition.causal_models(settings), None, ["digit_0_0", "last"])
    assert targets["tens_no_carry"] == targets["carry"] == addition.default_targets(settings, ["digit_0_0", "last"])


def test_step3_finds_the_study_folder_from_the_options_of_steps_1_and_2(own_task, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "metadata.json")):
        step3.main(["--out", str(tmp_path / "nowhere")], task=str(FOLDER))
    default = Path("results") / "ones_and_tens" / "organism" / "default_test" / "metadata.json"
    with pytest.raises(FileNotFoundError, match=str(default)):
        step3.main(["--test"], task=str(FOLDER))
    with pytest.raises(SystemExit):  # with --results, a step-1 option is an unknown argument
        step3.main(["--results", str(tmp_path), "--test"], task=str(FOLDER))
    assert step3.scores_folder_name(None, False, ["whole_numbers"]) == "scores_whole_numbers__all"


def test_addition_positions_need_no_template_variable():
    from experiments.token_positions import TokenPositionError
    from tasks.general_addition.token_positions import addend_spans

    assert addend_spans({"raw_input": "58+67="}, 2) == ((0, 2), (3, 5))
    assert addend_spans({"raw_input": "What is 123 plus 456? Answer:"}, 3, "plus_words") == ((8, 11), (17, 20))
    with pytest.raises(TokenPositionError, match="is not template 'compact'"):
        addend_spans({"raw_input": "58-67="}, 2)
    with pytest.raises(TokenPositionError, match="does not spell the setting's digits"):
        addend_spans({"raw_input": "58+67=", "digit_0_0": 1, "digit_0_1": 5, "digit_1_0": 7, "digit_1_1": 6}, 2)
