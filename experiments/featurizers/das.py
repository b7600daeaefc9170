"""DAS at one unit of a network (residual stream, attention output, MLP output or one head; one position or
several): learn a k-dimensional subspace whose interchange (base <- source) makes the network produce the counterfactual label, scored whole and teacher-forced, and judge it on held-out
pairs with the paired verdict test, next to full-vector patching and an untrained subspace of the same size.

Training sees only the pairs of the train split (split by pair, seeded); every answer token of the label is in
the loss. The network is frozen; gradients reach the trainable interchange only.

What does not change during training is computed once per dataset: the source residuals (one forward of the
sources), the teacher-forced base pass (every layer's residual and keys/values); per cell, the residual entering
the intervened layer. Each training step then runs only the layers above the cell on the columns from the first
intervened one, and the output head on the answer columns (`experiments.featurizers.suffix_training.SuffixForward`; where
that path is not exact for a model it runs the full hooked forward instead and says so in ``forward_mode``).

A cell is a `UnitCell` (any trainable component: residual stream, attention output, MLP output, one head's
output; one position or several jointly), or the residual shorthands `ResidualCell` (one layer, one token
position; a position yielding several tokens makes a joint unit) and `JointResidualCell` (one layer, several
positions). A unit of m tokens of width w is learned in the concatenated space of its m vectors (m·w): the
interchange sees (n, m·w). Residual cells train through the layers above them (`SuffixForward`); the other
components through the full teacher-forced forward of the training backend (`SiteForward`), exact by
construction.

The trainable interchange is any module following `TrainableInterchange` (`OrthogonalSubspace` by default;
`LowRankSubspace`, pyvene's low-rank parametrisation; Boundless DAS and DBM masks of
`experiments.featurizers.learned`); the held-out judgement uses its hard featurizer (``to_featurizer()``), the map
a sweep would use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, Union

import numpy as np
import torch

from causal.verdicts import paired_test
from experiments.attribution import ResidualAttribution, ResidualCell
from experiments.backends import backend_with
from experiments.featurizers import Featurizer
from experiments.featurizers.learned import OrthogonalMap, OrthogonalSubspace, optimise_interchange
from experiments.pipeline import LMPipeline
from experiments.backends.sites import Site, featurized_swap
from experiments.featurizers.suffix_training import SiteForward, SuffixForward, TeacherForcedBase
from experiments.token_positions import TokenPosition


class TrainableInterchange(Protocol):
    """What `ResidualDAS.fit` trains (a ``torch.nn.Module``): ``interchange(base, source)`` on (n, D) -> (n, D)
    and ``to_featurizer()`` (the hard map). Optional, found by name: ``penalty()`` (a scalar added to the loss)
    and ``set_progress(fraction)`` (called before each step with step / (steps - 1), for temperature schedules)."""

    def interchange(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor: ...

    def to_featurizer(self) -> Featurizer: ...


@dataclass(frozen=True)
class JointResidualCell:
    """One joint unit of the residual stream: the output of ``layer`` (-1: embeddings) at the tokens of all
    ``positions`` together (their residual vectors concatenated, in this order)."""

    layer: int
    positions: tuple[TokenPosition, ...]

    def __post_init__(self) -> None:
        if len(self.positions) < 1:
            raise ValueError("a joint cell needs at least one position")

    @property
    def cell_id(self) -> str:
        return f"L{self.layer}@{'+'.join(p.id for p in self.positions)}"


#: Components a featurizer can be trained at (the activation sites of `experiments.engine.model_units`).
TRAINABLE_COMPONENTS = ("block_output", "attention_output", "mlp_output", "head_attention_value_output")


@dataclass(frozen=True)
class UnitCell:
    """One unit of any trainable component: ``component`` of ``layer`` (block_output: -1 = embeddings; a head
    component names its query ``head``) at the tokens of all ``positions`` together (one position, or several
    for a joint unit; vectors concatenated in this order). Its id is the sweep's: ``L{layer}@{positions}``
    (`experiments.engine.intervention_experiment.PatchUnits`) or ``L{layer}H{head}@{positions}``
    (`PatchAttentionHeads`), positions joined by ``+`` (`experiments.token_positions.joint_position`)."""

    layer: int
    positions: tuple[TokenPosition, ...]
    component: str = "block_output"
    head: int | None = None

    def __post_init__(self) -> None:
        if self.component not in TRAINABLE_COMPONENTS:
            raise ValueError(f"cannot train at component {self.component!r}; trainable: {', '.join(TRAINABLE_COMPONENTS)}")
        if (self.component == "head_attention_value_output") != (self.head is not None):
            raise ValueError("a head index is required for head units and only for them")
        if len(self.positions) < 1:
            raise ValueError("a unit needs at least one position")
        Site.of_unit(self.layer, self.component)  # refuses a sublayer of the embeddings (layer -1)

    @property
    def cell_id(self) -> str:
        head = f"H{self.head}" if self.head is not None else ""
        return f"L{self.layer}{head}@{'+'.join(p.id for p in self.positions)}"

    @property
    def site(self) -> Site:
        return Site.of_unit(self.layer, self.component)


Cell = Union[ResidualCell, JointResidualCell, UnitCell]


def unit_cell(cell: Cell) -> UnitCell:
    """Any cell as a `UnitCell`."""
    if isinstance(cell, UnitCell):
        return cell
    if isinstance(cell, JointResidualCell):
        return UnitCell(cell.layer, tuple(cell.positions))
    return UnitCell(cell.layer, (cell.position,))


def _indices(cell: UnitCell, base: dict[str, Any], source: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Unpadded token indices of the cell in a base prompt and in its source prompt."""
    base_idx = [i for p in cell.positions for i in p.index(base)]
    source_idx = [i for p in cell.positions for i in p.counterfactual_index(source)]
    return base_idx, source_idx


@dataclass
class HeldOut:
    """One intervention judged on ``n`` test pairs: IIA, informative IIA (label differs from the unpatched
    network's output), the paired effect over the unpatched run (effect, CI, one-sided exact p) and the
    ``floor``: the unpatched network's IIA on the same pairs."""

    iia: float
    informative_iia: float
    n_informative: int
    effect: float
    effect_ci: tuple[float, float]
    p_value: float
    floor: float
    n: int

    @classmethod
    def of(cls, correct: np.ndarray, unpatched: np.ndarray) -> "HeldOut":
        """From per-pair booleans on the same test pairs: the label after the intervention (``correct``) and
        without it (``unpatched``)."""
        gained, lost = int((correct & ~unpatched).sum()), int((~correct & unpatched).sum())
        effect, low, high, p = paired_test(gained, lost, len(correct))
        informative = ~unpatched
        return cls(float(correct.mean()), float(correct[informative].mean()) if informative.any() else float("nan"),
                   int(informative.sum()), effect, (low, high), p, float(unpatched.mean()), len(correct))


@dataclass
class ResidualDASResult:
    cell_id: str
    k: int
    featurizer: Featurizer
    das: HeldOut
    full_vector: HeldOut
    untrained: HeldOut
    losses: list[float] = field(default_factory=list)
    forward_mode: str = "suffix"  # "suffix", or "full" where the suffix path does not apply (see SuffixForward)


@dataclass
class PreparedCell:
    """What training at one cell needs: the suffix forward, and (N, m·d) base and source vectors of the unit."""

    cell: UnitCell
    forward: "SuffixForward | SiteForward"
    base: torch.Tensor
    source: torch.Tensor
    unpatched: np.ndarray  # (N,) the unpatched network writes the counterfactual label


class ResidualDAS:
    """DAS at residual cells of ``pipeline`` on a set of counterfactual pairs with their labels.

    ``split``: (train, test) pair indices to use instead of a seeded split by ``test_fraction``.
    ``force_full_forward``: train through the full hooked forward even where the suffix path applies (a
    reference for the suffix path; same results)."""

    def __init__(self, pipeline: LMPipeline, bases: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]],
                 cf_labels: Sequence[Any], test_fraction: float = 0.25, seed: int = 0,
                 force_full_forward: bool = False, split: tuple[np.ndarray, np.ndarray] | None = None):
        if not (len(bases) == len(sources) == len(cf_labels)) or len(bases) < 4:
            raise ValueError("bases, sources and labels need the same length (at least 4 pairs)")
        self.pipeline, self.bases, self.sources, self.labels = pipeline, list(bases), list(sources), list(cf_labels)
        if split is not None:
            self.train, self.test = split
        else:
            order = np.random.default_rng(seed).permutation(len(self.bases))
            n_test = max(1, int(round(len(self.bases) * test_fraction)))
            self.test, self.train = order[:n_test], order[n_test:]
        self.seed = seed
        self.force_full_forward = force_full_forward
        self._shared: dict[str, Any] | None = None

    def _dataset(self) -> dict[str, Any]:
        """Once per dataset: the source residuals and the teacher-forced base pass."""
        if self._shared is None:
            access = ResidualAttribution(self.pipeline, [])
            src, src_offsets = access.residual_states(self.sources)
            answers = [access.answer_ids(label) for label in self.labels]
            inputs, starts, lengths = access.teacher_forced_inputs(self.bases, answers)
            base = TeacherForcedBase.run(self.pipeline, inputs, lengths, force_full=self.force_full_forward)
            self._shared = {"access": access, "src": src, "src_offsets": src_offsets, "starts": starts, "base": base,
                            "sites": {}}
        return self._shared

    def _site_states(self, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, source) activations of ``site``: on the teacher-forced base rows and on the source prompts,
        (N, T, d) or (N, T, H, d_head), collected once per site through the training backend."""
        shared = self._dataset()
        if site not in shared["sites"]:
            backend = backend_with("gradients", self.pipeline.model)
            with torch.no_grad():
                base = backend.collect([site], shared["base"].inputs)[site]
                source = backend.collect([site], self.pipeline.load(self.sources).model_inputs())[site]
            shared["sites"][site] = (base, source)
        return shared["sites"][site]

    def prepare(self, cell: Cell) -> PreparedCell:
        """The forward of ``cell`` (through the layers above it for the residual stream, the full forward for
        other components) and its (N, m·w) base and source vectors."""
        cell = unit_cell(cell)
        shared = self._dataset()
        n_layers = shared["access"].n_layers
        low = -1 if cell.component == "block_output" else 0
        if not low <= cell.layer < n_layers:
            raise ValueError(f"cell {cell.cell_id}: layer {cell.layer} out of range {low}..{n_layers - 1}")
        if cell.head is not None and not 0 <= cell.head < self.pipeline.num_heads:
            raise ValueError(f"cell {cell.cell_id}: head {cell.head} out of range 0..{self.pipeline.num_heads - 1}")
        base_cols, src_cols = [], []
        for i in range(len(self.bases)):
            base_idx, src_idx = _indices(cell, self.bases[i], self.sources[i])
            if len(base_idx) != len(src_idx):
                raise ValueError(f"cell {cell.cell_id}: {len(base_idx)} base tokens but {len(src_idx)} source tokens")
            if base_cols and len(base_idx) != len(base_cols[0]):
                raise ValueError(f"cell {cell.cell_id}: the unit must have the same number of tokens in every pair")
            base_cols.append([shared["starts"][i] + j for j in base_idx])
            src_cols.append([shared["src_offsets"][i] + j for j in src_idx])
        rows = torch.arange(len(self.bases))[:, None]
        forward: SuffixForward | SiteForward
        if cell.component == "block_output":
            r = cell.layer + 1
            forward = SuffixForward(shared["base"], r, base_cols)
            source = shared["src"][r][rows, torch.tensor(src_cols)].flatten(1).detach()
        else:
            base_states, source_states = self._site_states(cell.site)
            if cell.head is not None:
                base_states, source_states = base_states[:, :, cell.head], source_states[:, :, cell.head]
            forward = SiteForward(shared["base"], cell.site, base_cols, base_states[rows, torch.tensor(base_cols)],
                                  head=cell.head)
            source = source_states[rows, torch.tensor(src_cols)].flatten(1).detach()
        base = forward.base_values().flatten(1).detach()
        unpatched = forward.correct_of(rows[:, 0], forward.unpatched_logits()).cpu().numpy()
        return PreparedCell(cell, forward, base, source, unpatched)

    def _held_out(self, prep: PreparedCell, values: torch.Tensor) -> HeldOut:
        return HeldOut.of(prep.forward.correct(self.test, values).cpu().numpy(), prep.unpatched[self.test])

    def optimise(self, prep: PreparedCell, module: Any, steps: int = 300, batch_size: int = 32, lr: float = 1e-2,
                 on_step: Callable[[int], bool] | None = None, every: int = 1) -> list[float]:
        """Adam on ``module``'s parameters: per step a batch of train pairs (seeded, with replacement), loss =
        minus the mean summed answer log-probability under the interchange (plus ``module.penalty()``).
        ``on_step(n)`` is called after every ``every``-th step with the number of steps done; training stops
        early when it returns True. Returns the loss of each step run."""
        base, source, forward = prep.base, prep.source, prep.forward

        def batch_loss(picks: torch.Tensor) -> torch.Tensor:
            index = torch.as_tensor(self.train[picks.numpy()], device=base.device)
            return -forward.answer_logprob(index, module.interchange(base[index], source[index])).mean()

        return optimise_interchange(module, batch_loss, len(self.train), steps, batch_size, lr,
                                    torch.Generator().manual_seed(self.seed), on_step, every)

    def fit(self, cell: Cell, k: int = 2, steps: int = 300, batch_size: int = 32, lr: float = 1e-2,
            orthogonal_map: OrthogonalMap = "matrix_exp", module: Any = None) -> ResidualDASResult:
        """Train a k-dimensional DAS subspace (or ``module``, a `TrainableInterchange` on the unit's m·d space) at
        ``cell``; judge its hard featurizer, full-vector patching and an untrained subspace of the featurizer's
        size on the held-out pairs."""
        prep = self.prepare(cell)
        base, source = prep.base, prep.source
        default = module is None
        if default:
            module = OrthogonalSubspace(base.shape[-1], k, orthogonal_map, self.seed).to(base.dtype)
        losses = self.optimise(prep, module, steps, batch_size, lr)
        featurizer = module.to_featurizer(f"das-{k}@{prep.cell.cell_id}") if default else module.to_featurizer()
        size = int(featurizer.basis.shape[1]) if hasattr(featurizer, "basis") else k
        untrained = OrthogonalSubspace(base.shape[-1], size, orthogonal_map, self.seed + 1).to(base.dtype)
        test = torch.as_tensor(self.test, device=base.device)
        with torch.no_grad():
            das = self._held_out(prep, featurized_swap(featurizer, None, base[test], source[test]))
            full = self._held_out(prep, source[test])
            random = self._held_out(prep, untrained.interchange(base[test], source[test]))
        return ResidualDASResult(prep.cell.cell_id, size, featurizer, das, full, random, losses, prep.forward.mode)
