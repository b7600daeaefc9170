"""train_featurizer on the planted organisms: DAS recovers the planted subspace at the planted cell and beats
every control; at a cell carry_0 has not reached it finds nothing; splits keep a base's pairs together; a
saved featurizer loads identically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.attribution import ResidualCell
from experiments.featurizers.store import load_featurizer
from experiments.featurizers.training import LabelledPairs, TrainingSettings, train_featurizer
from experiments.pipeline import LMPipeline
from tasks.general_addition.organism import PLANTED_ALIGNED_DIR, PLANTED_ROTATED_DIR, load_planted_spec
from tasks.general_addition.task import TASK, AdditionSettings


def carry_pairs(n: int = 64, seed: int = 3) -> LabelledPairs:
    settings = AdditionSettings()
    datasets = TASK.make_datasets(settings, ["random", "flip_carry_0"], n, seed)
    return LabelledPairs.from_datasets(datasets, TASK.main_model(settings), "carry_0")


def test_splits_keep_pairs_of_one_base_together_and_are_seeded():
    bases = [{"raw_input": f"{i % 10:02d}+11="} for i in range(40)]
    pairs = LabelledPairs(bases, [{"raw_input": "55+55="}] * 40, ["1"] * 40)
    train, val, test = pairs.splits(0.2, 0.3, seed=0)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(40))
    for a, b in ((train, val), (train, test), (val, test)):
        assert not {bases[i]["raw_input"] for i in a} & {bases[i]["raw_input"] for i in b}
    assert all(np.array_equal(x, y) for x, y in zip((train, val, test), pairs.splits(0.2, 0.3, seed=0)))
    with pytest.raises(ValueError, match="too few"):
        LabelledPairs(bases[:2] * 4, bases[:8], ["1"] * 8).splits(0.2, 0.3, seed=0)  # 2 distinct bases


@pytest.fixture(scope="module")
def planted():
    return LMPipeline(str(PLANTED_ROTATED_DIR), device="cpu"), load_planted_spec(PLANTED_ROTATED_DIR)


def test_das_finds_the_planted_rotated_subspace_and_beats_every_control(planted, tmp_path):
    pipeline, spec = planted
    positions = {p.id: p for p in TASK.token_positions(pipeline, AdditionSettings())}
    # carry_0 has two values: one direction carries it, so k = 1 must lie inside the planted 2-d span
    settings = TrainingSettings(method="das", k=1, steps=150, eval_every=25)
    result = train_featurizer(pipeline, carry_pairs(), ResidualCell(spec.layer, positions[spec.position]), settings,
                              progress=False)
    assert result.found, result.reason
    assert result.test.iia > 0.9 and result.full_vector.iia < result.test.iia
    inside = torch.linalg.norm(spec.basis_matrix(torch.float64).T @ result.featurizer.basis.double())
    assert inside > 0.9, inside  # the share of the learned direction inside the planted span
    assert set(result.controls) == {"untrained", "permuted_labels", "random_weights"}
    assert all(c.held_out.iia < 0.5 for c in result.controls.values())
    record = result.save(tmp_path / "das")
    loaded, read = load_featurizer(tmp_path / "das")
    assert read == record and torch.equal(loaded.basis, result.featurizer.basis)


def test_nothing_is_found_where_carry_0_has_not_arrived(planted):
    pipeline, _ = planted
    positions = {p.id: p for p in TASK.token_positions(pipeline, AdditionSettings())}
    settings = TrainingSettings(method="das", k=2, steps=100, eval_every=25, controls=("untrained",))
    result = train_featurizer(pipeline, carry_pairs(), ResidualCell(1, positions["digit_1_1"]), settings,
                              progress=False)
    assert not result.found and result.test.iia < 0.5, (result.test, result.reason)
