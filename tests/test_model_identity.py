"""The weights' identity in a results manifest is a hash of their full content: an edit anywhere in a tensor
changes it, files are hashed once per (path, size, modification time), and a results folder refuses to resume
after the weights changed in place."""

from __future__ import annotations

import json

import pytest
import torch

from causal.results import ResultsError
from conftest import make_model
from experiments.engine.intervention_experiment import PatchResidualStream, model_fingerprint
from experiments.model_identity import cache_dir, file_sha256, tensors_sha256, weight_files, weights_probe
from experiments.pipeline import LMPipeline
from experiments.token_positions import last_token_position
from causal import CounterfactualDataset


def test_an_edit_in_the_middle_of_a_tensor_changes_the_identity_but_not_the_probe(char_tokenizer):
    model = make_model("llama", len(char_tokenizer))
    before, probe = tensors_sha256(model), weights_probe(model)
    with torch.no_grad():
        weight = model.model.layers[0].mlp.up_proj.weight
        weight[weight.shape[0] // 2, weight.shape[1] // 2] += 1e-3
    assert tensors_sha256(model) != before
    assert weights_probe(model) == probe, "the probe alone would have missed this edit"


def test_weight_files_are_hashed_once_and_again_after_a_rewrite(char_tokenizer, tmp_path):
    model = make_model("llama", len(char_tokenizer))
    model.save_pretrained(tmp_path)
    (path,) = weight_files(tmp_path)
    first = file_sha256(path)
    cache = json.loads((cache_dir() / "file-sha256.json").read_text())
    assert first in cache.values() and any(key.startswith(str(path.resolve())) for key in cache)
    assert file_sha256(path) == first
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] += 1e-3
    model.save_pretrained(tmp_path)  # rewritten in place
    assert file_sha256(path) != first
    cache = json.loads((cache_dir() / "file-sha256.json").read_text())
    assert sum(key.startswith(str(path.resolve())) for key in cache) == 1, "stale versions are dropped"


def test_resume_refuses_weights_changed_in_place(char_tokenizer, tmp_path):
    folder = tmp_path / "model"
    model = make_model("llama", len(char_tokenizer))
    model.save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    data = CounterfactualDataset.from_dict({"input": [{"raw_input": "12+34="}, {"raw_input": "5+6="}],
                                            "counterfactual_inputs": [[{"raw_input": "9+8="}], [{"raw_input": "1+1="}]]},
                                           id="pairs")

    def run():
        pipeline = LMPipeline(str(folder), device="cpu", max_new_tokens=2)
        identity = model_fingerprint(pipeline)
        experiment = PatchResidualStream(pipeline, [0], [last_token_position(pipeline)], config={"id": "r"})
        experiment.perform_interventions({"pairs": data}, results_dir=tmp_path / "raw", verbose=False)
        return identity

    first = run()
    assert first["weights_hashed_from"] == "files"
    assert run()["weights_sha256"] == first["weights_sha256"]  # resume: same identity, nothing to redo
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[7, 9] += 1e-2
    model.save_pretrained(folder)
    with pytest.raises(ResultsError, match="weights_sha256"):
        run()


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_lost_manifest_has_a_restart_path(damage, char_tokenizer, tmp_path):
    model = make_model("llama", len(char_tokenizer))
    pipeline = LMPipeline(model, tokenizer=char_tokenizer, device="cpu", max_new_tokens=2)
    data = CounterfactualDataset.from_dict({"input": [{"raw_input": "12+34="}, {"raw_input": "5+6="}],
                                            "counterfactual_inputs": [[{"raw_input": "9+8="}], [{"raw_input": "1+1="}]]},
                                           id="pairs")
    experiment = PatchResidualStream(pipeline, [0], [last_token_position(pipeline)], config={"id": "r"})
    folder = tmp_path / "raw"
    first = experiment.perform_interventions({"pairs": data}, results_dir=folder, verbose=False)
    rows = first.intervened_outputs().sort_values(["cell_id", "example_index"])["output_text"].tolist()
    manifest = folder / "manifest.json"
    if damage == "deleted":
        manifest.unlink()
    else:
        manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ResultsError, match="--restart"):
        experiment.perform_interventions({"pairs": data}, results_dir=folder, verbose=False)
    again = experiment.perform_interventions({"pairs": data}, results_dir=folder, verbose=False, restart=True)
    assert again.intervened_outputs().sort_values(["cell_id", "example_index"])["output_text"].tolist() == rows
