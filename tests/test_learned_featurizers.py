"""PCA and DAS featurizers: the identity holds exactly, and DAS recovers a subspace planted in a synthetic
model (and only that one), where a random subspace of the same size stays at chance."""

from __future__ import annotations

import pytest
import torch

from experiments.learned_featurizers import (
    OrthogonalSubspace,
    fit_pca,
    interchange_accuracy,
    train_das,
)


def planted_model(d: int = 16, values: int = 4, seed: int = 0):
    """A variable with ``values`` values lives in a 2-d subspace U of R^d (rotated, spread over every
    dimension); the readout decodes it from U only; everything else is nuisance."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    u, rest = q[:, :2], q[:, 2:]
    angles = torch.arange(values) * (2 * torch.pi / values)
    codes = torch.stack([angles.cos(), angles.sin()], 1) * 3.0  # (values, 2)

    def sample(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.randint(values, (n,), generator=g)
        nuisance = torch.randn(n, d - 2, generator=g) * 3.0
        return codes[v] @ u.T + nuisance @ rest.T, v

    def downstream(x: torch.Tensor) -> torch.Tensor:
        return (x @ u) @ codes.T  # logits: the nearest code in U

    return u, sample, downstream


def test_pca_and_das_featurizers_are_exact_identities():
    x = torch.randn(64, 12, dtype=torch.float64)
    for featurizer in (fit_pca(x, 3), OrthogonalSubspace(12, 4).double().to_featurizer()):
        features, error = featurizer.featurize(x)
        torch.testing.assert_close(featurizer.inverse(features, error), x, atol=1e-12, rtol=0)
    assert fit_pca(x, 3).weights_sha256() != fit_pca(x, 4).weights_sha256()


def test_pca_finds_the_direction_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    x = torch.randn(500, 1, generator=g) * 10 * direction + torch.randn(500, 8, generator=g) * 0.1
    pca = fit_pca(x, 1)
    assert abs(float(pca.basis[:, 0] @ direction)) > 0.999


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_das_recovers_a_planted_subspace(orthogonal_map):
    u, sample, downstream = planted_model()
    g = torch.Generator().manual_seed(1)
    base, _ = sample(512, g)
    source, source_values = sample(512, g)
    labels = source_values  # interchanging the variable makes the readout output the source's value
    result = train_das(downstream, base, source, labels, k=2, steps=300, orthogonal_map=orthogonal_map)
    assert result.test_accuracy >= 0.95, result.test_accuracy
    # the learned span equals U: the singular values of Uᵀ B (cosines of the principal angles) are ~1
    cosines = torch.linalg.svdvals(u.T @ result.featurizer.basis.double().to(u.dtype))
    assert cosines.min() > 0.95, cosines
    # controls: an untrained subspace of the same size stays near chance; training on permuted labels fails
    untrained = interchange_accuracy(OrthogonalSubspace(16, 2, orthogonal_map, seed=7), downstream, base, source, labels)
    assert untrained < 0.6, untrained
    permuted = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(3))]
    control = train_das(downstream, base, source, permuted, k=2, steps=300, orthogonal_map=orthogonal_map)
    assert control.test_accuracy < 0.5, control.test_accuracy


def test_residual_das_on_a_network_trains_only_the_subspace_and_judges_held_out_pairs(pipelines):
    from experiments.attribution import ResidualCell
    from experiments.residual_das import ResidualDAS
    from experiments.token_positions import TokenPosition

    pipeline = pipelines["llama"]
    prompts = [{"raw_input": f"{a}+{b}="} for a, b in [(12, 34), (5, 6), (77, 8), (40, 41), (3, 90), (66, 6), (1, 2), (9, 9)]]
    labels = ["1", "2", "3", "4", "5", "6", "7", "8"]
    before = [p.detach().clone() for p in pipeline.model.parameters()]
    last = TokenPosition(lambda s: [-1], pipeline, id="last")
    # a source equal to its base: every interchange is the identity, so nothing can move
    same = ResidualDAS(pipeline, prompts, prompts, labels, test_fraction=0.5).fit(ResidualCell(1, last), k=2, steps=3)
    for judged in (same.das, same.full_vector, same.untrained):
        assert judged.effect == 0.0 and judged.p_value == 1.0
    basis = same.featurizer.basis
    torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=basis.dtype), atol=1e-5, rtol=0)
    assert len(same.losses) == 3
    assert all(torch.equal(a, b) for a, b in zip(before, pipeline.model.parameters())), "the network stays frozen"
