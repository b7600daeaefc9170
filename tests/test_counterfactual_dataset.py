"""CounterfactualDataset: construction, types, fingerprints, save/load (torch-free)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from causal import CausalModel, CounterfactualDataset

ROOT = Path(__file__).resolve().parents[1]


def tiny_model() -> CausalModel:
    return CausalModel(
        ["template", "x", "y", "sum", "raw_input", "raw_output"],
        {"template": ["{x}+{y}=", "add {x} and {y}:"], "x": range(10), "y": range(10), "sum": range(19),
         "raw_input": None, "raw_output": None},
        {"template": [], "x": [], "y": [], "sum": ["x", "y"], "raw_input": ["template", "x", "y"],
         "raw_output": ["sum"]},
        {"template": lambda: "{x}+{y}=", "x": lambda: 0, "y": lambda: 0, "sum": lambda x, y: x + y,
         "raw_input": lambda t, x, y: t.format(x=x, y=y), "raw_output": lambda s: str(s)},
        id="tiny",
    )


def sampled(seed: int, size: int = 12, n_cf: int = 2) -> CounterfactualDataset:
    model = tiny_model()
    rng = random.Random(seed)

    def sampler() -> dict:
        return {
            "input": model.sample_input(rng=rng),
            "counterfactual_inputs": [model.sample_input(rng=rng) for _ in range(n_cf)],
        }

    return CounterfactualDataset.from_sampler(
        size, sampler, filter=lambda ex: ex["input"]["x"] != ex["counterfactual_inputs"][0]["x"], id=f"tiny_{seed}"
    )


def test_from_dict_types_and_access():
    data = CounterfactualDataset.from_dict(
        {
            "input": [{"x": 1, "raw_input": "1+2=", "flag": True}, {"x": 3, "raw_input": "3+4=", "flag": False}],
            "counterfactual_inputs": [[{"x": 5, "raw_input": "5+6=", "flag": False}],
                                      [{"x": 7, "raw_input": "7+8=", "flag": True},
                                       {"x": 9, "raw_input": "9+0=", "flag": True}]],
        },
        id="hand",
    )
    assert len(data) == 2 and data.id == "hand"
    example = data[1]
    assert example == {
        "input": {"x": 3, "raw_input": "3+4=", "flag": False},
        "counterfactual_inputs": [{"x": 7, "raw_input": "7+8=", "flag": True}, {"x": 9, "raw_input": "9+0=", "flag": True}],
    }
    assert type(example["input"]["x"]) is int and type(example["input"]["raw_input"]) is str
    assert type(example["input"]["flag"]) is bool
    example["input"]["x"] = 99  # a copy: the dataset is unchanged
    assert data[1]["input"]["x"] == 3
    assert [ex["input"]["x"] for ex in data] == [1, 3]
    assert data[-1]["input"]["x"] == 3
    with pytest.raises(IndexError):
        data[2]


def test_from_sampler_filter_and_size():
    data = sampled(0)
    assert len(data) == 12
    for example in data:
        assert example["input"]["x"] != example["counterfactual_inputs"][0]["x"]
        assert len(example["counterfactual_inputs"]) == 2
    with pytest.raises(RuntimeError, match="passed the filter"):
        CounterfactualDataset.from_sampler(3, lambda: {"input": {"x": 1}, "counterfactual_inputs": []},
                                           filter=lambda ex: False, max_attempts=50)


def test_determinism_under_seed():
    a, b = sampled(7), sampled(7)
    assert a.to_list() == b.to_list()
    assert a.fingerprint() == b.fingerprint()
    c = sampled(8)
    assert c.fingerprint() != a.fingerprint()
    assert len(a.fingerprint()) == 64


def test_fingerprint_depends_on_content_only():
    rows = {"input": [{"x": 1, "y": "a"}], "counterfactual_inputs": [[{"x": 2, "y": "b"}]]}
    reordered = {"input": [{"y": "a", "x": 1}], "counterfactual_inputs": [[{"y": "b", "x": 2}]]}
    one = CounterfactualDataset.from_dict(rows, id="one")
    assert one.fingerprint() == CounterfactualDataset.from_dict(reordered, id="two").fingerprint()
    changed = {"input": [{"x": 1, "y": "a"}], "counterfactual_inputs": [[{"x": 3, "y": "b"}]]}
    assert one.fingerprint() != CounterfactualDataset.from_dict(changed).fingerprint()


def test_save_load_round_trip_and_fingerprint_across_processes(tmp_path):
    data = sampled(3)
    folder = tmp_path / "ds"
    data.save(folder)
    assert json.loads((folder / "counterfactual_dataset.json").read_text())["id"] == "tiny_3"
    loaded = CounterfactualDataset.load(folder)
    assert loaded.id == "tiny_3"
    assert loaded.to_list() == data.to_list()
    assert loaded.fingerprint() == data.fingerprint()
    first = loaded[0]
    assert type(first["input"]["x"]) is int and type(first["input"]["template"]) is str
    assert type(first["counterfactual_inputs"][1]["y"]) is int
    assert CounterfactualDataset.load(folder, id="renamed").id == "renamed"
    # saving again over the same folder replaces it
    other = sampled(4)
    other.save(folder)
    assert CounterfactualDataset.load(folder).fingerprint() == other.fingerprint()
    # a fresh process (different hash seed) computes the same fingerprint
    code = (
        "import sys; from causal import CounterfactualDataset; "
        "print(CounterfactualDataset.load(sys.argv[1]).fingerprint())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == other.fingerprint()


def test_save_refuses_unrelated_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no saved dataset"):
        sampled(0, size=2).save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_load_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CounterfactualDataset.load(missing)


@pytest.mark.parametrize(
    "columns,culprit",
    [
        ({"counterfactual_inputs": [[{"x": 1}]]}, "'input'"),
        ({"input": [{"x": 1}]}, "'counterfactual_inputs'"),
        ({"input": ["not a dict"], "counterfactual_inputs": [[{"x": 1}]]}, "'input'"),
        ({"input": [{"x": 1}], "counterfactual_inputs": [{"x": 1}]}, "'counterfactual_inputs'"),
        ({"input": [{"x": 1}], "counterfactual_inputs": [[1, 2]]}, "'counterfactual_inputs'"),
    ],
)
def test_load_rejects_missing_or_mistyped_columns(tmp_path, columns, culprit):
    Dataset.from_dict(columns).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=culprit):
        CounterfactualDataset.load(tmp_path / "bad")


def test_settings_must_share_keys_and_types():
    with pytest.raises(ValueError, match=r"lacks \['y'\]"):
        CounterfactualDataset.from_dict({"input": [{"x": 1, "y": 2}], "counterfactual_inputs": [[{"x": 1}]]})
    with pytest.raises(ValueError, match="variable 'x'"):
        CounterfactualDataset.from_dict(
            {"input": [{"x": 1}, {"x": "one"}], "counterfactual_inputs": [[{"x": 1}], [{"x": 2}]]}
        )
    with pytest.raises(ValueError, match="counterfactual_inputs"):
        CounterfactualDataset.from_dict({"input": [{"x": 1}]})


def test_none_values_round_trip(tmp_path):
    data = CounterfactualDataset.from_dict(
        {"input": [{"x": 1, "note": None}], "counterfactual_inputs": [[{"x": 2, "note": "hi"}]]}, id="nones"
    )
    data.save(tmp_path / "n")
    loaded = CounterfactualDataset.load(tmp_path / "n")
    assert loaded[0] == {"input": {"x": 1, "note": None}, "counterfactual_inputs": [{"x": 2, "note": "hi"}]}


def test_display(capsys):
    sampled(1, size=3).display(2)
    printed = capsys.readouterr().out
    assert "[0] input:" in printed and "[1] input:" in printed and "[2]" not in printed
    assert "counterfactual 1:" in printed and "+" in printed


def test_corrupted_saved_dataset_is_a_clear_error(tmp_path):
    from causal.counterfactual_dataset import CounterfactualDataset

    ds = CounterfactualDataset.from_dict(
        {"input": [{"raw_input": "1+2="}], "counterfactual_inputs": [[{"raw_input": "3+4="}]]}, id="tiny")
    folder = tmp_path / "tiny"
    ds.save(folder)
    for arrow in folder.glob("*.arrow"):
        arrow.write_bytes(b"not an arrow file")
    with pytest.raises(ValueError, match="corrupted"):
        CounterfactualDataset.load(folder)


def test_dataset_dicts_must_be_keyed_by_id():
    from causal.counterfactual_dataset import CounterfactualDataset, as_dataset_dict

    ds = CounterfactualDataset.from_dict(
        {"input": [{"raw_input": "1+2="}], "counterfactual_inputs": [[{"raw_input": "3+4="}]]}, id="tiny")
    assert as_dataset_dict([ds]) == {"tiny": ds}
    with pytest.raises(ValueError, match="has id 'tiny'"):
        as_dataset_dict({"other": ds})
