"""PCA and DAS featurizers: the identity holds exactly, and DAS recovers a subspace planted in a synthetic
model (and only that one), where a random subspace of the same size stays at chance."""

from __future__ import annotations

import pytest
import torch

from experiments.featurizers.store import FeaturizerLoadError, load_featurizer, load_sae, save_featurizer
from experiments.featurizers import LinearFeaturizer, SAEFeaturizer
from experiments.featurizers.learned import (
    BoundlessSubspace,
    DimensionMask,
    OrthogonalSubspace,
    fit_pca,
    interchange_accuracy,
    train_das,
    train_interchange,
)
from experiments.backends.sites import featurized_swap


def planted_model(d: int = 16, values: int = 4, seed: int = 0, aligned: bool = False):
    """A variable with ``values`` values lives in a 2-d subspace U of R^d (rotated, spread over every
    dimension; with ``aligned`` the first two axes); the readout decodes it from U only; everything else is
    nuisance."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    if aligned:
        q = torch.eye(d)
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
    from experiments.featurizers.das import ResidualDAS
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


def _pairs(sample, n: int = 512, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    base, _ = sample(n, g)
    source, labels = sample(n, g)
    return base, source, labels


def _span_cosines(u: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(u) and span(basis) (all ~1 when basis spans u)."""
    q, _ = torch.linalg.qr(basis.double())
    return torch.linalg.svdvals(u.double().T @ q)


def test_boundless_das_learns_the_size_and_the_span_of_a_planted_subspace():
    u, sample, downstream = planted_model()
    base, source, labels = _pairs(sample)
    result = train_interchange(BoundlessSubspace(16, size_penalty=0.5), downstream, base, source, labels, steps=400)
    assert result.test_accuracy >= 0.95, result.test_accuracy
    size = result.featurizer.basis.shape[1]
    assert 2 <= size <= 4, size  # the boundary shrinks from 8 towards the planted 2
    assert _span_cosines(u, result.featurizer.basis).min() > 0.95


def test_dbm_finds_an_aligned_variable_with_a_sparse_mask_and_cannot_for_a_rotated_one():
    for relaxation in ("sigmoid", "hard_concrete"):
        _, sample, downstream = planted_model(aligned=True)
        base, source, labels = _pairs(sample)
        mask = DimensionMask(16, relaxation=relaxation, sparsity=0.5, seed=0)
        result = train_interchange(mask, downstream, base, source, labels, steps=400, lr=5e-2)
        assert mask.selected() == [0, 1], (relaxation, mask.selected())
        assert result.test_accuracy >= 0.95, (relaxation, result.test_accuracy)
    # the same variable in a rotated subspace: a mask keeping few dimensions cannot carry it
    _, sample, downstream = planted_model(aligned=False)
    base, source, labels = _pairs(sample)
    mask = DimensionMask(16, relaxation="sigmoid", sparsity=0.5, seed=0)
    result = train_interchange(mask, downstream, base, source, labels, steps=400, lr=5e-2)
    assert result.test_accuracy < 0.95 or len(mask.selected()) > 4, (result.test_accuracy, mask.selected())


def test_dimension_mask_over_groups_keeps_whole_groups_and_refuses_an_empty_mask():
    mask = DimensionMask(8, groups=4)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([5.0, -5.0, -5.0, 5.0]))
    mask.eval()
    assert mask.selected() == [0, 3]
    assert mask.to_featurizer().basis.shape == (8, 4)
    torch.testing.assert_close(mask.mask()[[0, 1, 6, 7]], torch.ones(4), atol=1e-2, rtol=0)
    with torch.no_grad():
        mask.logits.fill_(-5.0)
    with pytest.raises(ValueError, match="keeps no dimension"):
        mask.to_featurizer()
    with pytest.raises(ValueError, match="groups must divide"):
        DimensionMask(8, groups=3)


def _random_sae(d: int = 8, m: int = 24, threshold: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(d, m, generator=g), "b_enc": torch.randn(m, generator=g) * 0.1,
               "W_dec": torch.randn(m, d, generator=g) * 0.3, "b_dec": torch.randn(d, generator=g) * 0.1}
    if threshold:
        tensors["threshold"] = torch.rand(m, generator=g) * 0.5
    return tensors


@pytest.mark.parametrize("threshold", [False, True])
def test_sae_featurizer_is_exact_and_a_latent_swap_moves_only_its_decoder_direction(threshold):
    t = {k: v.double() for k, v in _random_sae(threshold=threshold).items()}
    sae = SAEFeaturizer(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold"))
    g = torch.Generator().manual_seed(1)
    base, source = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randn(32, 8, generator=g, dtype=torch.float64)
    features, error = sae.featurize(base)
    torch.testing.assert_close(sae.inverse(features, error), base, atol=1e-12, rtol=0)
    if threshold:  # JumpReLU: latents below their threshold are zero, the rest pass unchanged
        pre = base @ t["W_enc"] + t["b_enc"]
        torch.testing.assert_close(features, torch.where(pre > t["threshold"], pre, torch.zeros_like(pre)))
    mask = torch.zeros(24, dtype=torch.bool)
    mask[[3, 7]] = True
    moved = featurized_swap(sae, mask, base, source)
    delta = (sae.encode(source) - sae.encode(base))[:, [3, 7]] @ t["W_dec"][[3, 7]]
    torch.testing.assert_close(moved, base + delta, atol=1e-12, rtol=0)


def test_load_sae_reads_both_public_layouts_and_refuses_others(tmp_path):
    from safetensors.torch import save_file

    t = _random_sae()
    save_file(t, str(tmp_path / "saelens.safetensors"))
    save_file({"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"],
               "decoder.weight": t["W_dec"].T.contiguous(), "decoder.bias": t["b_dec"],
               "threshold": t["threshold"]}, str(tmp_path / "linear.safetensors"))
    x = torch.randn(5, 8)
    a, b = load_sae(tmp_path / "saelens.safetensors"), load_sae(tmp_path / "linear.safetensors")
    torch.testing.assert_close(a.featurize(x)[0], b.featurize(x)[0])
    assert a.weights_sha256() == b.weights_sha256()
    assert load_sae(tmp_path / "saelens.safetensors", subtract_decoder_bias=True).weights_sha256() != a.weights_sha256()
    save_file({"W_enc": t["W_enc"]}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="no known SAE layout"):
        load_sae(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="W_dec has shape"):
        SAEFeaturizer(t["W_enc"], t["b_enc"], t["W_dec"].T, t["b_dec"])


def test_saved_featurizers_load_identically_and_damage_is_refused(tmp_path):
    u, sample, downstream = planted_model()
    base, source, labels = _pairs(sample)
    trained = train_das(downstream, base, source, labels, k=2, steps=50).featurizer
    t = _random_sae()
    sae = SAEFeaturizer(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t["threshold"], id="sae-test")
    for name, featurizer in (("das", trained), ("sae", sae)):
        record = save_featurizer(featurizer, tmp_path / name, method=name, unit="L1@last", k=2, seed=0)
        loaded, read = load_featurizer(tmp_path / name)
        assert read == record and loaded.id == featurizer.id
        assert loaded.weights_sha256() == featurizer.weights_sha256()
        x = torch.randn(7, featurizer.tensors()["W_enc" if name == "sae" else "basis"].shape[0])
        for mine, theirs in zip(featurizer.featurize(x), loaded.featurize(x)):
            assert torch.equal(mine, theirs)
    (tmp_path / "das" / "featurizer.safetensors").write_bytes((tmp_path / "sae" / "featurizer.safetensors").read_bytes())
    with pytest.raises(FeaturizerLoadError):
        load_featurizer(tmp_path / "das")
    with pytest.raises(FeaturizerLoadError, match="not a saved featurizer"):
        load_featurizer(tmp_path / "nothing")
    with pytest.raises(ValueError, match="cannot save"):
        save_featurizer(DimensionMask(4), tmp_path / "mask")  # type: ignore[arg-type]
    assert isinstance(loaded, SAEFeaturizer) and isinstance(trained, LinearFeaturizer)
