"""`train_featurizer`: learn a featurizer for one causal variable at one unit of a network (residual stream,
attention output, MLP output or one head; one position or several jointly: `experiments.featurizers.das.UnitCell`),
with early stopping, a held-out verdict and the controls a learned map needs, and save it for sweeps.

Data: labelled counterfactual pairs (base prompt, source prompt, the causal model's counterfactual label when the
variable takes the source's value); pairs are split into train / validation / test **by base example** (pairs
sharing a base prompt stay together; seeded). The loss is the label's summed answer log-probability,
teacher-forced (`experiments.featurizers.das`; residual units train through the layers above them only).

Methods (``TrainingSettings.method``): ``das`` (k-dim orthogonal subspace), ``boundless_das`` (learned size),
``dbm`` (sigmoid mask over dimensions or groups), ``dbm_hard_concrete``, ``pca`` (top-k principal directions of
the unit's train activations; nothing trained). Every ``eval_every`` steps the validation IIA is measured and the
best state is kept; ``patience`` evaluations without improvement stop the run.

Judgement on the test pairs, paired on the same pairs throughout (`causal.verdicts.paired_test`):
- the learned featurizer's effect over the unpatched network (IIA gained minus lost, CI, one-sided exact p);
- against each control, trained and judged the same way: ``untrained`` (a random subspace of the learned size),
  ``permuted_labels`` (the same training on labels shuffled across train pairs), ``random_weights`` (the same
  training on a random-initialised network of the same architecture; expressive maps are known to reach high
  IIA on such networks). The method **finds** the variable at the unit only if it beats the unpatched network
  and every control run (each one-sided p < alpha: an intersection-union test, no correction needed across
  the controls; correct across units with `causal.verdicts`' Holm when scanning).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from causal.verdicts import paired_test
from experiments.featurizers.store import FeaturizerRecord, save_featurizer
from experiments.featurizers import Featurizer, LinearFeaturizer
from experiments.featurizers.learned import (BoundlessSubspace, DimensionMask, LowRankSubspace, OrthogonalMap,
                                             OrthogonalSubspace, fit_pca)
from experiments.pipeline import LMPipeline
from experiments.featurizers.das import Cell, HeldOut, PreparedCell, ResidualDAS
from experiments.backends.sites import featurized_swap

Method = Literal["das", "boundless_das", "dbm", "dbm_hard_concrete", "pca"]
Control = Literal["untrained", "permuted_labels", "random_weights"]
CONTROLS: tuple[Control, ...] = ("untrained", "permuted_labels", "random_weights")
DEFAULT_LR = {"das": 1e-2, "boundless_das": 1e-2, "dbm": 5e-2, "dbm_hard_concrete": 5e-2, "pca": 0.0}


class TrainingSettings(BaseModel):
    """How a featurizer is trained and judged (all of it is part of the saved record)."""

    model_config = ConfigDict(extra="forbid")

    method: Method = "das"
    k: int = Field(2, ge=1, description="subspace size (das, pca); boundless/dbm learn theirs")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float | None = Field(None, gt=0, description="default per method (DEFAULT_LR)")
    orthogonal_map: OrthogonalMap | Literal["low_rank"] = Field(
        "low_rank", description="DAS parametrisation: low_rank (a (D, k) orthonormal basis, pyvene's low-rank DAS) or "
                                "the orthogonal map of a full (D, D) rotation (matrix_exp, cayley, householder)")
    seed: int = 0
    validation_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.25, gt=0, lt=0.6)
    eval_every: int = Field(50, ge=1)
    patience: int = Field(3, ge=1, description="evaluations without a better validation IIA before stopping")
    sparsity: float = Field(0.01, ge=0, description="DBM mask penalty weight")
    groups: int | None = Field(None, ge=1, description="DBM: mask over this many equal groups (None: dimensions)")
    size_penalty: float = Field(1.0, ge=0, description="Boundless DAS boundary penalty weight")
    controls: tuple[Control, ...] = CONTROLS
    alpha: float = Field(0.05, gt=0, lt=1)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass(frozen=True)
class LabelledPairs:
    """Counterfactual pairs and the labels a hypothesis gives them for one variable."""

    bases: list[dict[str, Any]]
    sources: list[dict[str, Any]]
    labels: list[Any]
    variable: str = ""

    def __post_init__(self) -> None:
        if not (len(self.bases) == len(self.sources) == len(self.labels)):
            raise ValueError(f"{len(self.bases)} bases, {len(self.sources)} sources and {len(self.labels)} labels")
        if len(self.bases) < 8:
            raise ValueError(f"need at least 8 labelled pairs to split three ways, got {len(self.bases)}")

    @classmethod
    def from_datasets(cls, datasets: dict[str, Any], causal_model: Any, variable: str) -> "LabelledPairs":
        """Every pair of ``datasets`` (CounterfactualDatasets, in order) with ``causal_model``'s counterfactual
        label when ``variable`` takes the source's value (the first counterfactual input is the source)."""
        examples = [e for d in datasets.values() for e in d.to_list()]
        labels = [label for d in datasets.values() for label in causal_model.label_counterfactual_data(d, [variable])]
        return cls([e["input"] for e in examples], [e["counterfactual_inputs"][0] for e in examples], labels, variable)

    def fingerprint(self) -> str:
        """sha256 of every pair and label, in order (the data's identity in a saved record)."""
        text = json.dumps([self.bases, self.sources, [str(x) for x in self.labels], self.variable], sort_keys=True,
                          default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def splits(self, validation_fraction: float, test_fraction: float, seed: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, validation, test) pair indices; pairs with the same base prompt land in the same split."""
        keys = [json.dumps(b, sort_keys=True, default=str) for b in self.bases]
        groups = list(dict.fromkeys(keys))
        order = np.random.default_rng(seed).permutation(len(groups))
        n_test = max(1, int(round(len(groups) * test_fraction)))
        n_val = max(1, int(round(len(groups) * validation_fraction)))
        if n_test + n_val >= len(groups):
            raise ValueError(f"{len(groups)} distinct base prompts are too few for a train/validation/test split")
        split_of = {groups[g]: (2 if i < n_test else 1 if i < n_test + n_val else 0) for i, g in enumerate(order)}
        which = np.array([split_of[k] for k in keys])
        return tuple(np.flatnonzero(which == s) for s in range(3))  # type: ignore[return-value]


@dataclass
class ControlComparison:
    """A control judged on the same test pairs as the method, and the paired test of method vs control."""

    name: str
    held_out: HeldOut
    method_gain: float
    gain_ci: tuple[float, float]
    p_value: float


@dataclass
class TrainedFeaturizer:
    """One trained featurizer at one unit, judged: test effect over the unpatched run, full-vector patching of
    the same unit, each control, and whether the method finds the variable there (``found``, ``reason``)."""

    cell_id: str
    settings: TrainingSettings
    featurizer: Featurizer
    test: HeldOut
    full_vector: HeldOut
    controls: dict[str, ControlComparison]
    found: bool
    reason: str
    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    stopped_at: int = 0
    data_fingerprint: str = ""
    forward_mode: str = "suffix"
    component: str = "block_output"

    @property
    def size(self) -> int:
        """Dimensions the featurizer interchanges."""
        basis = getattr(self.featurizer, "basis", None)
        return int(basis.shape[1]) if basis is not None else -1

    def save(self, folder: str | Path, model_sha256: str = "") -> FeaturizerRecord:
        """Save the featurizer with a record of how it was made (`experiments.featurizers.store`)."""
        return save_featurizer(self.featurizer, folder, method=self.settings.method, unit=self.cell_id,
                               component=self.component, k=self.size,
                               seed=self.settings.seed, data_fingerprint=self.data_fingerprint,
                               model_sha256=model_sha256,
                               extra={"settings": self.settings.model_dump(mode="json"), "stopped_at": self.stopped_at,
                                      "test_iia": self.test.iia, "found": self.found})


def _module(settings: TrainingSettings, width: int, dtype: torch.dtype) -> torch.nn.Module:
    s = settings
    if s.method == "das":
        if s.orthogonal_map == "low_rank":
            return LowRankSubspace(width, s.k, s.seed).to(dtype)
        return OrthogonalSubspace(width, s.k, s.orthogonal_map, s.seed).to(dtype)
    if s.method == "boundless_das":
        rotation = "matrix_exp" if s.orthogonal_map == "low_rank" else s.orthogonal_map  # a full rotation
        return BoundlessSubspace(width, rotation, s.seed, size_penalty=s.size_penalty).to(dtype)
    relaxation = "hard_concrete" if s.method == "dbm_hard_concrete" else "sigmoid"
    return DimensionMask(width, s.groups, relaxation, s.sparsity, seed=s.seed).to(dtype)


class _Run:
    """One network + one pair split: training of a method at a unit and per-pair correctness on test pairs."""

    def __init__(self, pipeline: LMPipeline, pairs: LabelledPairs, labels: Sequence[Any], split: tuple[np.ndarray, ...],
                 seed: int):
        self.train, self.validation, self.test = split
        self.das = ResidualDAS(pipeline, pairs.bases, pairs.sources, list(labels), seed=seed,
                               split=(self.train, self.test))

    def fit(self, cell: Cell, settings: TrainingSettings, prep: PreparedCell | None = None
            ) -> tuple[PreparedCell, Featurizer, list[float], list[tuple[int, float]], int]:
        prep = prep or self.das.prepare(cell)
        if settings.method == "pca":
            featurizer = fit_pca(prep.base[torch.as_tensor(self.train)], min(settings.k, prep.base.shape[-1]))
            return prep, featurizer, [], [], 0
        module = _module(settings, prep.base.shape[-1], prep.base.dtype)
        best: dict[str, Any] = {"iia": -1.0, "state": None, "step": 0}
        curve: list[tuple[int, float]] = []
        validation = torch.as_tensor(self.validation, device=prep.base.device)

        def evaluate(step: int) -> bool:
            module.eval()
            with torch.no_grad():
                values = module.interchange(prep.base[validation], prep.source[validation])
                iia = float(prep.forward.correct(self.validation, values).float().mean())
            module.train()
            curve.append((step, iia))
            if iia > best["iia"]:
                best.update(iia=iia, state=copy.deepcopy(module.state_dict()), step=step)
            return (step - best["step"]) >= settings.patience * settings.eval_every

        losses = self.das.optimise(prep, module, settings.steps, settings.batch_size, settings.learning_rate,
                                   on_step=evaluate, every=settings.eval_every)
        if best["state"] is not None:
            module.load_state_dict(best["state"])
        module.eval()
        return prep, module.to_featurizer(), losses, curve, int(best["step"])

    def correct(self, prep: PreparedCell, featurizer: Featurizer | None) -> np.ndarray:
        """(n_test,) whether the network writes the label after the interchange (None: full-vector)."""
        test = torch.as_tensor(self.test, device=prep.base.device)
        with torch.no_grad():
            values = prep.source[test] if featurizer is None else featurized_swap(featurizer, None, prep.base[test],
                                                                                  prep.source[test])
            return prep.forward.correct(self.test, values).cpu().numpy()

    def judge(self, prep: PreparedCell, correct: np.ndarray) -> HeldOut:
        return HeldOut.of(correct, prep.unpatched[self.test])


def random_weight_pipeline(pipeline: LMPipeline, seed: int = 0) -> LMPipeline:
    """A network of the same architecture and tokenizer with random initial weights (seeded)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(pipeline.model.config)
    return LMPipeline(model, max_new_tokens=pipeline.max_new_tokens, device=pipeline.device,
                      dtype=pipeline.model.dtype, tokenizer=pipeline.tokenizer)


def train_featurizer(pipeline: LMPipeline, pairs: LabelledPairs, cell: Cell,
                     settings: TrainingSettings | None = None, random_pipeline: LMPipeline | None = None,
                     progress: bool = True) -> TrainedFeaturizer:
    """Train ``settings.method`` at ``cell`` on ``pairs``, judge it on the held-out test pairs against the
    unpatched network, full-vector patching and every control of ``settings.controls``."""
    settings = settings or TrainingSettings()
    split = pairs.splits(settings.validation_fraction, settings.test_fraction, settings.seed)
    run = _Run(pipeline, pairs, pairs.labels, split, settings.seed)
    jobs = ["train", *settings.controls]
    bar = tqdm(total=len(jobs), desc=f"{settings.method} @ {getattr(cell, 'cell_id', cell)}", leave=False,
               disable=not progress)
    prep, featurizer, losses, curve, stopped = run.fit(cell, settings)
    bar.update()
    mine = run.correct(prep, featurizer)
    test = run.judge(prep, mine)
    full = run.judge(prep, run.correct(prep, None))
    controls: dict[str, ControlComparison] = {}
    size = int(getattr(featurizer, "basis", torch.empty(0, settings.k)).shape[1])
    for name in settings.controls:
        if name == "untrained":
            other_run, other_prep = run, prep
            other = LowRankSubspace(prep.base.shape[-1], size, settings.seed + 1).to(prep.base.dtype).to_featurizer()
        elif name == "permuted_labels":
            labels = list(pairs.labels)
            order = np.random.default_rng(settings.seed + 1).permutation(run.train)
            for i, j in zip(run.train, order):
                labels[i] = pairs.labels[j]
            other_run = _Run(pipeline, pairs, labels, split, settings.seed)
            # judged against the true labels: the test split keeps its true labels and forward
            _, other, _, _, _ = other_run.fit(cell, settings)
            other_run, other_prep = run, prep
        else:
            other_run = _Run(random_pipeline or random_weight_pipeline(pipeline, settings.seed), pairs, pairs.labels,
                             split, settings.seed)
            other_prep, other, _, _, _ = other_run.fit(cell, settings)
        theirs = other_run.correct(other_prep, other)
        gained, lost = int((mine & ~theirs).sum()), int((~mine & theirs).sum())
        gain, low, high, p = paired_test(gained, lost, len(mine))
        controls[name] = ControlComparison(name, other_run.judge(other_prep, theirs), gain, (low, high), p)
        bar.update()
    bar.close()
    failed = [n for n, c in controls.items() if not c.p_value < settings.alpha]
    if not test.p_value < settings.alpha:
        found, reason = False, f"no effect over the unpatched network (p = {test.p_value:.2g})"
    elif failed:
        found, reason = False, f"does not beat the control(s) {', '.join(failed)}"
    else:
        found, reason = True, "beats the unpatched network and every control"
    return TrainedFeaturizer(prep.cell.cell_id, settings, featurizer, test, full, controls, found, reason, losses,
                             curve, stopped, pairs.fingerprint(), prep.forward.mode, prep.cell.component)
