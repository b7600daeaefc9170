"""Featurizers: the basis in which a unit's activation is interchanged.

Contract (as in causalab): ``featurize(x) -> (features, error)`` and ``inverse(features, error) -> x``,
acting on the last dimension; ``inverse(*featurize(x)) == x`` exactly. The error term is what the
features do not capture, so a lossy map (a sparse autoencoder, a low-rank projection) stays exact on
the part that is not swapped. An interchange through a featurizer swaps chosen features only
(``experiments.backends.sites.featurized_swap``). A learned featurizer (DAS rotation, mask, PCA, SAE) only adds
a subclass: ``id`` names it, ``weights_sha256()`` fingerprints its parameters for the results manifest.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def tensors_sha256(tensors: list[torch.Tensor]) -> str:
    """sha256 over each tensor's shape and exact float32 bytes, in order ("" for no tensors)."""
    if not tensors:
        return ""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


class Featurizer:
    """Base class and identity map: features are the activation itself, the error is None."""

    id = "identity"

    def featurize(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return x, None

    def inverse(self, features: torch.Tensor, error: Any) -> torch.Tensor:
        return features

    def parameters(self) -> list[torch.Tensor]:
        """Tensors that define the map (none for the identity)."""
        return list(self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The defining tensors by name, as saved by `experiments.featurizers.store` (none for the identity)."""
        return {}

    def weights_sha256(self) -> str:
        """sha256 over every defining tensor's shape and exact bytes ("" for a parameter-free map)."""
        return tensors_sha256(self.parameters())

    @property
    def is_identity(self) -> bool:
        return type(self) is Featurizer

    @property
    def input_width(self) -> int | None:
        """The width of the vectors it maps (None: any width, the identity). A width of m·d at a unit of m
        tokens of width d means the map acts on the m vectors concatenated (a joint unit)."""
        return None


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

    @property
    def input_width(self) -> int:
        return int(self.basis.shape[0])

    def featurize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centred = x - self.mean.to(x)
        features = centred @ self.basis.to(x)
        error = centred - features @ self.basis.to(x).T
        return features, error

    def inverse(self, features: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        return features @ self.basis.to(features).T + self.mean.to(features) + error

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"basis": self.basis, "mean": self.mean}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], id: str) -> "LinearFeaturizer":
        return cls(tensors["basis"], tensors["mean"], id=id)


class SAEFeaturizer(Featurizer):
    """A sparse autoencoder's latents as features; the error is the SAE's reconstruction error, so
    ``inverse(*featurize(x)) == x`` (to float rounding) and swapping chosen latents moves only their decoder
    directions: ``x_b + (f_s - f_b)[j] @ W_dec[j]``.

    Shapes: ``W_enc`` (d, m), ``b_enc`` (m,), ``W_dec`` (m, d), ``b_dec`` (d,), optional ``threshold`` (m,)
    (JumpReLU: a latent is kept where its pre-activation exceeds its threshold; ReLU without one).
    ``subtract_decoder_bias``: encode ``x - b_dec`` (SAELens' ``apply_b_dec_to_input``) instead of ``x``."""

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                 threshold: torch.Tensor | None = None, subtract_decoder_bias: bool = False, id: str = "sae"):
        d, m = W_enc.shape
        expected = {"b_enc": (m,), "W_dec": (m, d), "b_dec": (d,), "threshold": (m,)}
        for name, t in (("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec), ("threshold", threshold)):
            if t is not None and tuple(t.shape) != expected[name]:
                raise ValueError(f"SAE {name} has shape {tuple(t.shape)}, expected {expected[name]} for W_enc {(d, m)}")
        self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold = W_enc, b_enc, W_dec, b_dec, threshold
        self.subtract_decoder_bias = subtract_decoder_bias
        self.id = id

    @property
    def input_width(self) -> int:
        return int(self.W_enc.shape[0])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(…, m) latent activations of x (…, d)."""
        sae_in = x - self.b_dec.to(x) if self.subtract_decoder_bias else x
        pre = sae_in @ self.W_enc.to(x) + self.b_enc.to(x)
        if self.threshold is None:
            return torch.relu(pre)
        return pre * (pre > self.threshold.to(x))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents @ self.W_dec.to(latents) + self.b_dec.to(latents)

    def featurize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.encode(x)
        return latents, x - self.decode(latents)

    def inverse(self, features: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        return self.decode(features) + error

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        # the flag changes the map, so it is part of the fingerprint
        out["subtract_decoder_bias"] = torch.tensor([float(self.subtract_decoder_bias)])
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], id: str) -> "SAEFeaturizer":
        flag = tensors.get("subtract_decoder_bias")
        return cls(tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"], tensors.get("threshold"),
                   bool(flag.item()) if flag is not None else False, id=id)
