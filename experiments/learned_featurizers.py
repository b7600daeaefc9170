"""Learned featurizers on the featurizer contract: PCA and distributed alignment search (DAS).

Both produce a `LinearFeaturizer` (features = (x - mean) @ basis, the error keeps the rest of x exactly), so a
learned map is interchanged, fingerprinted and stored like any other featurizer.

- `fit_pca(activations, k)`: the top-k principal directions of activations collected at a unit.
- `OrthogonalSubspace`: a trainable (d, k) basis with orthonormal columns, parametrised as users expect:
  ``"matrix_exp"``, ``"cayley"`` or ``"householder"`` (``torch.nn.utils.parametrizations.orthogonal``).
- `train_das`: learns the subspace whose interchange (base with its subspace component replaced by the
  source's) makes a differentiable downstream map produce the counterfactual labels: the DAS objective.
  ``downstream(x) -> logits`` is whatever lies above the unit (a readout here; the network's layers above the
  unit when it is wired to the engine).

Done so far: the maths, tested on a synthetic model with a planted subspace (`tests/test_learned_featurizers.py`).
Not yet: training through a network's layers above a unit via the engine, Boundless DAS, masks, SAEs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from experiments.featurizers import LinearFeaturizer

OrthogonalMap = Literal["matrix_exp", "cayley", "householder"]


def fit_pca(activations: torch.Tensor, k: int) -> LinearFeaturizer:
    """PCA featurizer of ``activations`` (n, d): the top-``k`` principal directions, centred on their mean."""
    if activations.ndim != 2:
        raise ValueError(f"activations must be (n, d), got {tuple(activations.shape)}")
    n, d = activations.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"k must be in 1..{min(n, d)} for {n} activations of width {d}, got {k}")
    x = activations.double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vh[:k].T.contiguous()
    return LinearFeaturizer(basis.to(activations.dtype), mean.to(activations.dtype), id=f"pca-{k}")


class OrthogonalSubspace(nn.Module):
    """A (d, k) basis with orthonormal columns, trainable through ``torch``'s orthogonal parametrisation."""

    def __init__(self, d: int, k: int, orthogonal_map: OrthogonalMap = "matrix_exp", seed: int = 0):
        super().__init__()
        if not 1 <= k <= d:
            raise ValueError(f"k must be in 1..{d}, got {k}")
        generator = torch.Generator().manual_seed(seed)
        self.rotation = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
            self.rotation.weight.copy_(q)
        nn.utils.parametrizations.orthogonal(self.rotation, orthogonal_map=orthogonal_map)
        self.k = k

    @property
    def basis(self) -> torch.Tensor:
        """(d, k): the first k columns of the orthogonal matrix."""
        return self.rotation.weight[:, : self.k]

    def interchange(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``base`` with its component in the subspace replaced by ``source``'s: x_b + (x_s - x_b) P Pᵀ."""
        basis = self.basis
        return base + ((source - base) @ basis) @ basis.T

    def to_featurizer(self, id: str | None = None) -> LinearFeaturizer:
        return LinearFeaturizer(self.basis.detach().clone(), id=id or f"das-{self.k}")


@dataclass
class DASResult:
    """The trained subspace, its featurizer, the loss per step and the interchange accuracy on held-out pairs."""

    subspace: OrthogonalSubspace
    featurizer: LinearFeaturizer
    losses: list[float]
    test_accuracy: float


def interchange_accuracy(subspace: OrthogonalSubspace, downstream: Callable[[torch.Tensor], torch.Tensor],
                         base: torch.Tensor, source: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of pairs whose downstream argmax after the subspace interchange equals the label."""
    with torch.no_grad():
        return float((downstream(subspace.interchange(base, source)).argmax(-1) == labels).float().mean())


def train_das(downstream: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor, source: torch.Tensor,
              labels: torch.Tensor, k: int, steps: int = 300, batch_size: int = 32, lr: float = 1e-2,
              orthogonal_map: OrthogonalMap = "matrix_exp", seed: int = 0, test_fraction: float = 0.25) -> DASResult:
    """DAS: learn a k-dimensional subspace of the unit's activations whose interchange (base <- source) makes
    ``downstream`` output ``labels`` (cross-entropy); pairs are split into train and test by ``test_fraction``.

    ``base``/``source``: (n, d) activations of the base and source inputs at the unit; ``labels`` (n,) the
    counterfactual labels (class ids of ``downstream``'s output). The downstream map is frozen."""
    n, d = base.shape
    if source.shape != base.shape or labels.shape != (n,):
        raise ValueError("base and source must be (n, d) and labels (n,)")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    n_test = max(1, int(round(n * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    subspace = OrthogonalSubspace(d, k, orthogonal_map, seed)
    optimiser = torch.optim.Adam(subspace.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        batch = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=generator)]
        logits = downstream(subspace.interchange(base[batch], source[batch]))
        loss = nn.functional.cross_entropy(logits, labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    accuracy = interchange_accuracy(subspace, downstream, base[test], source[test], labels[test])
    return DASResult(subspace, subspace.to_featurizer(), losses, accuracy)
