"""Learned featurizers on the featurizer contract: PCA and distributed alignment search (DAS).

Both produce a `LinearFeaturizer` (features = (x - mean) @ basis, the error keeps the rest of x exactly), so a
learned map is interchanged, fingerprinted and stored like any other featurizer.

- `fit_pca(activations, k)`: the top-k principal directions of activations collected at a unit.
- `OrthogonalSubspace`: a trainable (d, k) basis with orthonormal columns, parametrised as users expect:
  ``"matrix_exp"``, ``"cayley"`` or ``"householder"`` (``torch.nn.utils.parametrizations.orthogonal``).
- `BoundlessSubspace` (Boundless DAS): a rotation whose interchanged subspace size is learned, through a
  sigmoid boundary over the rotated dimensions annealed from soft to hard, with a size penalty.
- `DimensionMask` (DBM): a learned mask over dimensions, or over groups of them (heads), with a sigmoid or
  hard-concrete relaxation and a sparsity penalty; the mask is readable (`selected()`).
- `train_interchange` / `train_das`: learn any of them so that the interchange (base with the learned part
  replaced by the source's) makes a differentiable downstream map produce the counterfactual labels.
  ``downstream(x) -> logits`` is whatever lies above the unit (a readout in the synthetic tests; the
  network's layers above the unit in `experiments.featurizers.das`).

Trainable interchanges share one protocol: ``interchange(base, source)`` on (n, D); optional ``penalty()``
(added to the loss) and ``set_progress(fraction)`` (temperature schedules); ``to_featurizer()`` gives the
hard map (a `LinearFeaturizer`) that sweeps use and `experiments.featurizers.store` saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import math

import torch
from torch import nn

from experiments.featurizers import Featurizer, LinearFeaturizer
from experiments.backends.sites import featurized_swap

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


class BoundlessSubspace(nn.Module):
    """Boundless DAS: a rotation R (d, d) and a learned boundary b ∈ (0, 1); rotated dimension i is
    interchanged with weight ``sigmoid((b·d - i) / T)``. T is annealed from ``temperature[0]`` to
    ``temperature[1]`` by `set_progress`; ``penalty() = size_penalty · b`` pulls the subspace small.
    The hard map keeps ``size = max(1, round(b·d))`` rotated dimensions."""

    def __init__(self, d: int, orthogonal_map: OrthogonalMap = "matrix_exp", seed: int = 0,
                 temperature: tuple[float, float] = (50.0, 0.1), size_penalty: float = 1.0, initial_size: float = 0.5):
        super().__init__()
        if not 0 < initial_size < 1:
            raise ValueError(f"initial_size is a fraction of d in (0, 1), got {initial_size}")
        self.rotation = OrthogonalSubspace(d, d, orthogonal_map, seed)
        self.boundary_logit = nn.Parameter(torch.tensor(math.log(initial_size / (1 - initial_size))))
        self.temperature_schedule, self.size_penalty, self.d = temperature, size_penalty, d
        self.temperature = temperature[0]
        self.register_buffer("dims", torch.arange(d, dtype=torch.float32), persistent=False)

    def set_progress(self, fraction: float) -> None:
        start, end = self.temperature_schedule
        self.temperature = start + (end - start) * min(max(fraction, 0.0), 1.0)

    def boundary(self) -> torch.Tensor:
        """The learned subspace size as a fraction of d."""
        return torch.sigmoid(self.boundary_logit)

    def weights(self) -> torch.Tensor:
        """(d,) interchange weight of each rotated dimension at the current temperature."""
        return torch.sigmoid((self.boundary() * self.d - self.dims.to(self.boundary_logit) - 0.5) / self.temperature)

    @property
    def size(self) -> int:
        return max(1, int(round(float(self.boundary().detach()) * self.d)))

    def interchange(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        r = self.rotation.rotation.weight
        return base + (((source - base) @ r) * self.weights().to(base)) @ r.T

    def penalty(self) -> torch.Tensor:
        return self.size_penalty * self.boundary()

    def to_featurizer(self, id: str | None = None) -> LinearFeaturizer:
        basis = self.rotation.rotation.weight[:, : self.size].detach().clone()
        return LinearFeaturizer(basis, id=id or f"boundless-das-{self.size}")


MaskRelaxation = Literal["sigmoid", "hard_concrete"]


class DimensionMask(nn.Module):
    """DBM: a learned mask m ∈ [0, 1] over ``groups`` equal groups of the d dimensions (groups = d: single
    dimensions; groups = heads: whole heads); interchange ``base + m ⊙ (source - base)``.

    - ``"sigmoid"``: m = sigmoid(α / T), T annealed from ``temperature[0]`` to ``temperature[1]``; penalty =
      ``sparsity · mean(m)``.
    - ``"hard_concrete"`` (Louizos et al. 2018): m is a stretched, clamped concrete sample while training
      (β = 2/3, γ = -0.1, ζ = 1.1; seeded) and its deterministic value in eval; penalty = ``sparsity ·``
      expected share of non-zero gates.

    The hard mask keeps the groups whose deterministic gate exceeds 0.5 (`selected()`)."""

    BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1

    def __init__(self, d: int, groups: int | None = None, relaxation: MaskRelaxation = "sigmoid",
                 sparsity: float = 0.01, temperature: tuple[float, float] = (1.0, 0.01), seed: int = 0):
        super().__init__()
        groups = d if groups is None else groups
        if groups < 1 or d % groups:
            raise ValueError(f"groups must divide d = {d}, got {groups}")
        if relaxation not in ("sigmoid", "hard_concrete"):
            raise ValueError(f"relaxation must be 'sigmoid' or 'hard_concrete', got {relaxation!r}")
        self.d, self.groups, self.relaxation, self.sparsity = d, groups, relaxation, sparsity
        self.logits = nn.Parameter(torch.zeros(groups))
        self.temperature_schedule = temperature
        self.temperature = temperature[0]
        self.generator = torch.Generator().manual_seed(seed)

    def set_progress(self, fraction: float) -> None:
        start, end = self.temperature_schedule
        self.temperature = start + (end - start) * min(max(fraction, 0.0), 1.0)

    def gates(self) -> torch.Tensor:
        """(groups,) gate values: relaxed samples while training (hard-concrete), deterministic otherwise."""
        if self.relaxation == "sigmoid":
            return torch.sigmoid(self.logits / self.temperature)
        if self.training:
            u = torch.rand(self.groups, generator=self.generator).clamp(1e-6, 1 - 1e-6).to(self.logits)
            s = torch.sigmoid((u.log() - (1 - u).log() + self.logits) / self.BETA)
        else:
            s = torch.sigmoid(self.logits)
        return (s * (self.ZETA - self.GAMMA) + self.GAMMA).clamp(0.0, 1.0)

    def mask(self) -> torch.Tensor:
        """(d,) the gates spread over their groups' dimensions."""
        return self.gates().repeat_interleave(self.d // self.groups)

    def interchange(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return base + self.mask().to(base) * (source - base)

    def penalty(self) -> torch.Tensor:
        if self.relaxation == "sigmoid":
            open_share = torch.sigmoid(self.logits / self.temperature).mean()
        else:
            open_share = torch.sigmoid(self.logits - self.BETA * math.log(-self.GAMMA / self.ZETA)).mean()
        return self.sparsity * open_share

    def selected(self) -> list[int]:
        """Groups the hard mask keeps: deterministic gate > 0.5."""
        with torch.no_grad():
            if self.relaxation == "sigmoid":
                gate = torch.sigmoid(self.logits)
            else:
                gate = (torch.sigmoid(self.logits) * (self.ZETA - self.GAMMA) + self.GAMMA).clamp(0.0, 1.0)
        return [int(i) for i in torch.nonzero(gate > 0.5).flatten()]

    def to_featurizer(self, id: str | None = None) -> LinearFeaturizer:
        """The kept dimensions as an axis-aligned basis; a mask that keeps nothing is an error, not a no-op."""
        groups = self.selected()
        if not groups:
            raise ValueError("the learned mask keeps no dimension: there is no featurizer to give")
        size = self.d // self.groups
        dims = [g * size + j for g in groups for j in range(size)]
        basis = torch.eye(self.d, dtype=self.logits.dtype)[:, dims]
        return LinearFeaturizer(basis, id=id or f"dbm-{len(groups)}of{self.groups}")


class LowRankSubspace(nn.Module):
    """A (D, k) basis with orthonormal columns parametrised as pyvene's low-rank DAS is: ``torch``'s orthogonal
    parametrisation of a (D, k) weight (its default map for a non-square weight, Householder), the weight held
    by ``rotate_layer`` as in pyvene's ``LowRankRotateLayer`` (state dicts load across); interchange
    x_b + (x_s - x_b) W Wᵀ. Cheaper per step than a (D, D) matrix exponential, and without the directions
    of a full rotation that leave the subspace unchanged (their gradient is rounding noise, which Adam's
    normalised first steps turn into updates of size lr)."""

    def __init__(self, d: int, k: int, seed: int = 0):
        super().__init__()
        if not 1 <= k <= d:
            raise ValueError(f"k must be in 1..{d}, got {k}")
        generator = torch.Generator().manual_seed(seed)
        self.rotate_layer = nn.Module()
        q, _ = torch.linalg.qr(torch.randn(d, k, generator=generator))
        self.rotate_layer.weight = nn.Parameter(q)
        with torch.random.fork_rng(devices=[]):  # the parametrisation completes q to a (D, D) basis at random
            torch.manual_seed(seed)
            nn.utils.parametrizations.orthogonal(self.rotate_layer)
        self.k = k

    @property
    def basis(self) -> torch.Tensor:
        return self.rotate_layer.weight

    def interchange(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        basis = self.basis
        return base + ((source - base) @ basis) @ basis.T

    def to_featurizer(self, id: str | None = None) -> LinearFeaturizer:
        return LinearFeaturizer(self.basis.detach().clone(), id=id or f"das-{self.k}")


@dataclass
class DASResult:
    """The trained module, its hard featurizer, the loss per step and the interchange accuracy on held-out pairs."""

    subspace: nn.Module
    featurizer: LinearFeaturizer
    losses: list[float]
    test_accuracy: float


def interchange_accuracy(interchange: "nn.Module | Featurizer", downstream: Callable[[torch.Tensor], torch.Tensor],
                         base: torch.Tensor, source: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of pairs whose downstream argmax after the interchange equals the label; ``interchange`` is a
    trainable module (its ``interchange``) or a featurizer (all its features swapped, as sweeps do)."""
    with torch.no_grad():
        if isinstance(interchange, Featurizer):
            patched = featurized_swap(interchange, None, base, source)
        else:
            patched = interchange.interchange(base, source)
        return float((downstream(patched).argmax(-1) == labels).float().mean())


def optimise_interchange(module: nn.Module, batch_loss: Callable[[torch.Tensor], torch.Tensor], n_train: int,
                         steps: int, batch_size: int, lr: float, generator: torch.Generator,
                         on_step: Callable[[int], bool] | None = None, every: int = 1) -> list[float]:
    """The training loop of every trainable interchange: Adam on ``module``'s trainable parameters; per step
    ``batch_loss(picks)`` on a batch of ``min(batch_size, n_train)`` indices into the train rows (drawn from
    ``generator``, with replacement), plus ``module.penalty()`` if it has one; ``module.set_progress(step /
    (steps - 1))`` before each step if it has one. ``on_step(n)`` is called after every ``every``-th step with
    the number of steps done; training stops early when it returns True. The module is left in eval mode.
    Returns the loss of each step run."""
    optimiser = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    penalty = getattr(module, "penalty", None)
    progress = getattr(module, "set_progress", None)
    losses = []
    module.train()
    for step in range(steps):
        if progress is not None:
            progress(step / max(1, steps - 1))
        loss = batch_loss(torch.randint(n_train, (min(batch_size, n_train),), generator=generator))
        if penalty is not None:
            loss = loss + penalty()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if on_step is not None and (step + 1) % every == 0 and on_step(step + 1):
            break
    module.eval()
    return losses


def train_interchange(module: nn.Module, downstream: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor,
                      source: torch.Tensor, labels: torch.Tensor, steps: int = 300, batch_size: int = 32,
                      lr: float = 1e-2, seed: int = 0, test_fraction: float = 0.25) -> DASResult:
    """Train a trainable interchange (`OrthogonalSubspace`, `BoundlessSubspace`, `DimensionMask`) so that
    ``downstream`` outputs ``labels`` after it (cross-entropy, plus the module's ``penalty()``); the pairs are
    split into train and test by ``test_fraction`` (seeded). The downstream map is frozen.

    ``base``/``source``: (n, d) activations of the base and source inputs at the unit; ``labels`` (n,) the
    counterfactual labels (class ids of ``downstream``'s output). Test accuracy is that of the hard featurizer
    (``to_featurizer()``), the map a sweep would use, not of the relaxed module."""
    n, d = base.shape
    if source.shape != base.shape or labels.shape != (n,):
        raise ValueError("base and source must be (n, d) and labels (n,)")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    n_test = max(1, int(round(n * test_fraction)))
    test, train = order[:n_test], order[n_test:]

    def batch_loss(picks: torch.Tensor) -> torch.Tensor:
        batch = train[picks]
        return nn.functional.cross_entropy(downstream(module.interchange(base[batch], source[batch])), labels[batch])

    losses = optimise_interchange(module, batch_loss, len(train), steps, batch_size, lr, generator)
    featurizer = module.to_featurizer()
    accuracy = interchange_accuracy(featurizer, downstream, base[test], source[test], labels[test])
    return DASResult(module, featurizer, losses, accuracy)


def train_das(downstream: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor, source: torch.Tensor,
              labels: torch.Tensor, k: int, steps: int = 300, batch_size: int = 32, lr: float = 1e-2,
              orthogonal_map: OrthogonalMap = "matrix_exp", seed: int = 0, test_fraction: float = 0.25) -> DASResult:
    """DAS: `train_interchange` of a k-dimensional `OrthogonalSubspace` of the unit's activations."""
    return train_interchange(OrthogonalSubspace(base.shape[-1], k, orthogonal_map, seed), downstream, base, source,
                             labels, steps, batch_size, lr, seed, test_fraction)
