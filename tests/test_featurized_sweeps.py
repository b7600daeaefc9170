"""Sweeps through trained featurizers: a cell interchanges through its own featurizer on both backends, a
featurizer spanning every dimension equals the full-vector swap, a cell without one is refused before any
work (never scored as a full-vector swap), and results of different featurizers never share a folder."""

from __future__ import annotations

import pytest
import torch

from causal.results import ResultsError
from experiments.featurizers.store import load_featurizers, save_featurizer
from experiments.featurizers import LinearFeaturizer
from experiments.engine.intervention_experiment import MissingFeaturizerError, PatchResidualStream
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


def _units_sweep(pipeline, folder, component, featurizers=None, backend="hooks", positions=None):
    from experiments.engine.intervention_experiment import PatchUnits

    exp = PatchUnits(pipeline, LAYERS, positions or sweep_positions(pipeline), component,
                     config={"id": "units", "batch_size": 2, "backend": backend}, featurizers=featurizers)
    return as_python_table(exp.perform_interventions(dataset(), results_dir=folder, verbose=False)
                           .intervened_outputs("toy"))


def _heads_sweep(pipeline, folder, featurizers=None, backend="hooks"):
    from experiments.engine.intervention_experiment import PatchAttentionHeads

    exp = PatchAttentionHeads(pipeline, [[(0, 0)], [(1, 1)]], sweep_positions(pipeline),
                              config={"id": "heads", "batch_size": 2, "backend": backend}, featurizers=featurizers)
    return as_python_table(exp.perform_interventions(dataset(), results_dir=folder, verbose=False)
                           .intervened_outputs("toy"))


@pytest.mark.parametrize("component", ["attention_output", "mlp_output"])
def test_featurized_sweeps_of_attention_and_mlp_units(component, pipelines, tmp_path):
    pipeline = pipelines["llama"]
    d = pipeline.model.config.hidden_size
    subspaces = random_subspaces(d, 2, cell_ids(pipeline))
    hooks, pyvene = (_units_sweep(pipeline, tmp_path / b, component, subspaces, backend=b) for b in ("hooks", "pyvene"))
    assert_same_outputs(hooks, pyvene)
    rotated = _units_sweep(pipeline, tmp_path / "rotated", component, random_subspaces(d, d, cell_ids(pipeline)))
    assert_same_outputs(rotated, _units_sweep(pipeline, tmp_path / "full", component))


def test_featurized_head_sweeps_agree_across_backends_and_a_full_rotation_is_the_plain_swap(pipelines, tmp_path):
    pipeline = pipelines["llama"]
    d_head = pipeline.model.config.hidden_size // pipeline.model.config.num_attention_heads
    ids = [f"{h}@{p.id}" for h in ("L0H0", "L1H1") for p in sweep_positions(pipeline)]
    subspaces = random_subspaces(d_head, 2, ids)
    hooks, pyvene = (_heads_sweep(pipeline, tmp_path / b, subspaces, backend=b) for b in ("hooks", "pyvene"))
    assert_same_outputs(hooks, pyvene)
    assert_same_outputs(_heads_sweep(pipeline, tmp_path / "rotated", random_subspaces(d_head, d_head, ids)),
                        _heads_sweep(pipeline, tmp_path / "full"))
    from experiments.engine.intervention_experiment import PatchAttentionHeads

    with pytest.raises(ValueError, match="single heads"):
        PatchAttentionHeads(pipeline, [[(0, 0), (1, 1)]], sweep_positions(pipeline), featurizers=subspaces)


def test_joint_units_interchange_through_one_featurizer_over_their_tokens(pipelines, tmp_path):
    from experiments.token_positions import joint_position

    pipeline = pipelines["llama"]
    d = pipeline.model.config.hidden_size
    joint = [joint_position(sweep_positions(pipeline))]  # last token + first digit, concatenated (2·d)
    ids = [f"L{layer}@{joint[0].id}" for layer in LAYERS]
    subspaces = random_subspaces(2 * d, 2, ids)
    hooks, pyvene = (_units_sweep(pipeline, tmp_path / b, "block_output", subspaces, backend=b, positions=joint)
                     for b in ("hooks", "pyvene"))
    assert_same_outputs(hooks, pyvene)
    # a rotation of the whole 2·d space swaps both tokens whole: the plain joint swap
    rotated = _units_sweep(pipeline, tmp_path / "rotated", "block_output", random_subspaces(2 * d, 2 * d, ids),
                           positions=joint)
    assert_same_outputs(rotated, _units_sweep(pipeline, tmp_path / "full", "block_output", positions=joint))
    per_token = _units_sweep(pipeline, tmp_path / "per_token", "block_output", random_subspaces(d, 2, ids),
                             positions=joint)
    assert not per_token.equals(hooks), "a d-wide featurizer acts per token, a 2·d-wide one jointly"
    with pytest.raises(ValueError, match="acts on 3 tokens jointly"):
        _units_sweep(pipeline, tmp_path / "wrong", "block_output", random_subspaces(3 * d, 2, ids), positions=joint)
