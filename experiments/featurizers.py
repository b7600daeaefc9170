"""Featurizers: the basis in which a unit's activation is interchanged.

Contract (as in causalab): ``featurize(x) -> (features, error)`` and ``inverse(features, error) -> x``,
acting on the last dimension; ``inverse(*featurize(x)) == x`` exactly. The error term is what the
features do not capture, so a lossy map (a sparse autoencoder, a low-rank projection) stays exact on
the part that is not swapped. An interchange through a featurizer swaps chosen features only
(``experiments.sites.featurized_swap``). A learned featurizer (DAS rotation, mask, PCA, SAE) only adds
a subclass: ``id`` names it, ``weights_sha256()`` fingerprints its parameters for the results manifest.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


class Featurizer:
    """Base class and identity map: features are the activation itself, the error is None."""

    id = "identity"

    def featurize(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return x, None

    def inverse(self, features: torch.Tensor, error: Any) -> torch.Tensor:
        return features

    def parameters(self) -> list[torch.Tensor]:
        """Tensors that define the map (none for the identity)."""
        return []

    def weights_sha256(self) -> str:
        """sha256 over every defining tensor's shape and exact bytes ("" for a parameter-free map)."""
        tensors = self.parameters()
        if not tensors:
            return ""
        digest = hashlib.sha256()
        for t in tensors:
            t = t.detach().to("cpu", torch.float32).contiguous()
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()

    @property
    def is_identity(self) -> bool:
        return type(self) is Featurizer


IdentityFeaturizer = Featurizer


class LinearFeaturizer(Featurizer):
    """``features = (x - mean) @ basis`` with an orthonormal-column ``basis`` (d, k); the error keeps the
    rest of x exactly: ``inverse(f, e) = f @ basisᵀ + mean + e``. k = d with an orthogonal basis is a
    rotation (the form a DAS featurizer takes); k < d is a subspace (e.g. PCA)."""

    def __init__(self, basis: torch.Tensor, mean: torch.Tensor | None = None, id: str = "linear"):
        if basis.ndim != 2 or basis.shape[1] > basis.shape[0]:
            raise ValueError(f"basis must be (d, k) with k <= d, got {tuple(basis.shape)}")
        self.basis = basis
        self.mean = torch.zeros(basis.shape[0], dtype=basis.dtype, device=basis.device) if mean is None else mean
        self.id = id

    def featurize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centred = x - self.mean.to(x)
        features = centred @ self.basis.to(x)
        error = centred - features @ self.basis.to(x).T
        return features, error

    def inverse(self, features: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        return features @ self.basis.to(features).T + self.mean.to(features) + error

    def parameters(self) -> list[torch.Tensor]:
        return [self.basis, self.mean]
