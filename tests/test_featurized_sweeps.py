"""Sweeps through trained featurizers: a cell interchanges through its own featurizer on both backends, a
featurizer spanning every dimension equals the full-vector swap, a cell without one is refused before any
work (never scored as a full-vector swap), and results of different featurizers never share a folder."""

from __future__ import annotations

import pytest
import torch

from causal.results import ResultsError
from experiments.featurizer_store import load_featurizers, save_featurizer
from experiments.featurizers import LinearFeaturizer
from experiments.intervention_experiment import MissingFeaturizerError, PatchResidualStream
from test_engine_reference import as_python_table, dataset, sweep_positions

LAYERS = [0, 1]


def random_subspaces(d: int, k: int, cells: list[str], seed: int = 0) -> dict[str, LinearFeaturizer]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for cell in cells:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        out[cell] = LinearFeaturizer(q[:, :k].contiguous(), id=f"subspace-{k}")
    return out


def assert_same_outputs(a, b) -> None:
    """Equal outputs, tokens and top-k ids; top-k logits equal to float rounding (backends compute differently)."""
    assert a.drop(columns=["topk_logits"]).equals(b.drop(columns=["topk_logits"]))
    for x, y in zip(a.topk_logits, b.topk_logits):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-4, rtol=0)


def cell_ids(pipeline) -> list[str]:
    return [f"L{layer}@{p.id}" for layer in LAYERS for p in sweep_positions(pipeline)]


def run(pipeline, folder, featurizers=None, backend="hooks", exp_id="sweep"):
    exp = PatchResidualStream(pipeline, LAYERS, sweep_positions(pipeline),
                              config={"id": exp_id, "batch_size": 2, "backend": backend}, featurizers=featurizers)
    return exp.perform_interventions(dataset(), results_dir=folder, verbose=False)


def test_featurized_sweep_agrees_across_backends_and_loads_from_saved_featurizers(pipelines, tmp_path):
    pipeline = pipelines["llama"]
    d = pipeline.model.config.hidden_size
    for cell, featurizer in random_subspaces(d, 2, cell_ids(pipeline)).items():
        save_featurizer(featurizer, tmp_path / "featurizers" / cell, method="random", unit=cell, k=2)
    featurizers = load_featurizers(tmp_path / "featurizers")
    tables = [as_python_table(run(pipeline, tmp_path / b, featurizers, backend=b).intervened_outputs("toy"))
              for b in ("hooks", "pyvene")]
    assert_same_outputs(tables[0], tables[1])
    full = as_python_table(run(pipeline, tmp_path / "full").intervened_outputs("toy"))
    assert not tables[0].equals(full), "a 2-d subspace swap differs from the full-vector swap somewhere"


def test_a_featurizer_spanning_every_dimension_equals_the_full_vector_swap(pipelines, tmp_path):
    pipeline = pipelines["llama"]
    d = pipeline.model.config.hidden_size
    rotations = random_subspaces(d, d, cell_ids(pipeline))
    rotated = run(pipeline, tmp_path / "rotated", rotations).intervened_outputs("toy")
    full = run(pipeline, tmp_path / "full").intervened_outputs("toy")
    assert_same_outputs(as_python_table(rotated), as_python_table(full))


def test_a_cell_without_a_featurizer_is_refused_and_featurizers_never_mix(pipelines, tmp_path):
    pipeline = pipelines["llama"]
    d = pipeline.model.config.hidden_size
    featurizers = random_subspaces(d, 2, cell_ids(pipeline))
    partial = dict(list(featurizers.items())[1:])
    with pytest.raises(MissingFeaturizerError, match="1 cell"):
        run(pipeline, tmp_path / "partial", partial)
    assert not (tmp_path / "partial").exists(), "refused before any work"
    with pytest.raises(MissingFeaturizerError, match="not in the sweep"):
        run(pipeline, tmp_path / "extra", {**featurizers, "L9@last": featurizers[cell_ids(pipeline)[0]]})
    run(pipeline, tmp_path / "run", featurizers)
    other = random_subspaces(d, 2, cell_ids(pipeline), seed=1)
    with pytest.raises(ResultsError):
        run(pipeline, tmp_path / "run", other)
