"""DAS at one residual-stream cell of a network: learn a k-dimensional subspace whose interchange (base <- source)
makes the network produce the counterfactual label, scored whole and teacher-forced, and judge it on held-out
pairs with the paired verdict test, next to full-vector patching and an untrained subspace of the same size.

Training sees only the pairs of the train split (split by pair, seeded); every answer token of the label is in
the loss. The network is frozen; gradients reach the subspace only. The teacher-forced runs reuse the residual
access of `experiments.attribution.ResidualAttribution` (the same hooks, sequences and log-probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from causal.verdicts import paired_test
from experiments.attribution import ResidualAttribution, ResidualCell
from experiments.featurizers import LinearFeaturizer
from experiments.learned_featurizers import OrthogonalMap, OrthogonalSubspace
from experiments.pipeline import LMPipeline


@dataclass
class HeldOut:
    """One intervention judged on the test pairs: IIA, informative IIA (label differs from the unpatched
    network's output) and the paired effect over the unpatched run (effect, CI, one-sided exact p)."""

    iia: float
    informative_iia: float
    n_informative: int
    effect: float
    effect_ci: tuple[float, float]
    p_value: float


@dataclass
class ResidualDASResult:
    cell_id: str
    k: int
    featurizer: LinearFeaturizer
    das: HeldOut
    full_vector: HeldOut
    untrained: HeldOut
    losses: list[float] = field(default_factory=list)


class ResidualDAS:
    """DAS at residual cells of ``pipeline`` on a set of counterfactual pairs with their labels."""

    def __init__(self, pipeline: LMPipeline, bases: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]],
                 cf_labels: Sequence[Any], test_fraction: float = 0.25, seed: int = 0):
        if not (len(bases) == len(sources) == len(cf_labels)) or len(bases) < 4:
            raise ValueError("bases, sources and labels need the same length (at least 4 pairs)")
        self.pipeline, self.bases, self.sources, self.labels = pipeline, list(bases), list(sources), list(cf_labels)
        n = len(self.bases)
        order = np.random.default_rng(seed).permutation(n)
        n_test = max(1, int(round(n * test_fraction)))
        self.test, self.train = order[:n_test], order[n_test:]
        self.seed = seed

    def _prepare(self, cell: ResidualCell) -> dict[str, Any]:
        access = ResidualAttribution(self.pipeline, [cell])
        r = cell.layer + 1
        src, src_offsets = access.residual_states(self.sources)
        answers = [access.answer_ids(label) for label in self.labels]
        inputs, starts, lengths = access.teacher_forced_inputs(self.bases, answers)
        store: list[torch.Tensor | None] = [None] * (access.n_layers + 1)
        handles = access.residual_hooks(store, leaf=False)
        try:
            with torch.no_grad():
                logits = self.pipeline.model(**inputs, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        n = len(self.bases)
        base_cols, src_cols = [], []
        for i in range(n):
            base_idx = cell.position.index(self.bases[i])
            src_idx = cell.position.counterfactual_index(self.sources[i])
            if len(base_idx) != 1 or len(src_idx) != 1:
                raise ValueError(f"cell {cell.cell_id}: DAS here takes single-token positions")
            base_cols.append(starts[i] + base_idx[0])
            src_cols.append(src_offsets[i] + src_idx[0])
        rows = torch.arange(n)
        return {"access": access, "r": r, "inputs": inputs, "lengths": lengths, "base_cols": base_cols,
                "base": store[r][rows, base_cols].detach(), "source": src[r][rows, src_cols].detach(),
                "unpatched": self._correct(logits, inputs, lengths)}

    @staticmethod
    def _correct(logits: torch.Tensor, inputs: dict[str, torch.Tensor], lengths: list[int]) -> np.ndarray:
        """Per row: the argmax at every answer step equals the teacher-forced label token (greedy would write it)."""
        width = logits.shape[1]
        out = []
        for b, m in enumerate(lengths):
            cols = torch.arange(width - m, width, device=logits.device)
            out.append(bool((logits[b, cols - 1].argmax(-1) == inputs["input_ids"][b, cols]).all()))
        return np.array(out)

    def _run(self, prep: dict[str, Any], rows: np.ndarray, values: torch.Tensor) -> tuple[torch.Tensor, dict, list]:
        access = prep["access"]
        sub = {k: v[torch.as_tensor(rows)] for k, v in prep["inputs"].items()}
        device = sub["input_ids"].device
        patch = (prep["r"], torch.arange(len(rows), device=device),
                 torch.tensor([prep["base_cols"][i] for i in rows], device=device), values)
        store: list[torch.Tensor | None] = [None] * (access.n_layers + 1)
        handles = access.residual_hooks(store, leaf=False, patch=patch)
        try:
            logits = self.pipeline.model(**sub, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return logits, sub, [prep["lengths"][i] for i in rows]

    def _held_out(self, prep: dict[str, Any], values: torch.Tensor) -> HeldOut:
        with torch.no_grad():
            logits, sub, lengths = self._run(prep, self.test, values)
        patched = self._correct(logits, sub, lengths)
        unpatched = prep["unpatched"][self.test]
        informative = ~unpatched
        gained, lost = int((patched & ~unpatched).sum()), int((~patched & unpatched).sum())
        effect, low, high, p = paired_test(gained, lost, len(patched))
        return HeldOut(float(patched.mean()), float(patched[informative].mean()) if informative.any() else float("nan"),
                       int(informative.sum()), effect, (low, high), p)

    def fit(self, cell: ResidualCell, k: int = 2, steps: int = 300, batch_size: int = 32, lr: float = 1e-2,
            orthogonal_map: OrthogonalMap = "matrix_exp") -> ResidualDASResult:
        """Train a k-dimensional DAS subspace at ``cell``; judge it, full-vector patching and an untrained
        subspace of the same size on the held-out pairs."""
        prep = self._prepare(cell)
        base, source = prep["base"], prep["source"]
        subspace = OrthogonalSubspace(base.shape[-1], k, orthogonal_map, self.seed).to(base.dtype)
        untrained = OrthogonalSubspace(base.shape[-1], k, orthogonal_map, self.seed + 1).to(base.dtype)
        optimiser = torch.optim.Adam(subspace.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(self.seed)
        losses = []
        for _ in range(steps):
            rows = self.train[torch.randint(len(self.train), (min(batch_size, len(self.train)),),
                                            generator=generator).numpy()]
            logits, sub, lengths = self._run(prep, rows, subspace.interchange(base[rows], source[rows]))
            loss = -prep["access"].answer_logprob(logits, sub, lengths).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        test = self.test
        with torch.no_grad():
            das = self._held_out(prep, subspace.interchange(base[test], source[test]))
            full = self._held_out(prep, source[test])
            random = self._held_out(prep, untrained.interchange(base[test], source[test]))
        return ResidualDASResult(cell.cell_id, k, subspace.to_featurizer(f"das-{k}@{cell.cell_id}"), das, full, random,
                                 losses)
