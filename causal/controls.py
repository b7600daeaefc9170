"""Control hypotheses: labels false by construction, scored on the same raw results as the real ones.

A sound study locates none of them. Each control is a label function (see `causal.score_labels`):

* :func:`permuted_labels` — a variable's interchange labels permuted among the pairs of each family: the
  label of pair i belongs to another pair's base and source, which the network patched with pair i's
  never sees;
* :func:`shuffled_source_labels` — pair i's base run with the variable taken from *another* pair's
  counterfactual input: a variable whose value the patch does not carry.

Both are seeded and deterministic per (family, seed). Torch-free.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from causal.causal_model import RAW_OUTPUT, CausalModel, parse_target
from causal.counterfactual_dataset import CounterfactualDataset

LabelFunction = Callable[[CounterfactualDataset], list[Any]]


def _permutation(dataset: CounterfactualDataset, seed: int, salt: str) -> np.ndarray:
    """A permutation of the pairs of ``dataset``, fixed by (dataset id, fingerprint, seed, salt); no fixed
    points where the dataset has more than one pair."""
    key = f"{dataset.id}|{dataset.fingerprint()}|{seed}|{salt}".encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    n = len(dataset)
    if n < 2:
        return np.arange(n)
    order = rng.permutation(n)
    return np.roll(order, 1)[np.argsort(order)]  # a random cyclic permutation: i never maps to itself


def _checked_group(causal_model: CausalModel, variables: Sequence[str]) -> list[str]:
    group = [variables] if isinstance(variables, str) else list(variables)
    for key in group:
        for var in parse_target(key):
            if var not in causal_model.parents:
                raise ValueError(f"control variable {var!r} is not a variable of causal model {causal_model.id!r}")
    return group


def permuted_labels(causal_model: CausalModel, variables: Sequence[str] | str, seed: int = 0,
                    counterfactual_index: int = 0) -> LabelFunction:
    """Labels of ``variables``' interchange, permuted among each family's pairs (no pair keeps its own)."""
    group = _checked_group(causal_model, variables)

    def labels(dataset: CounterfactualDataset) -> list[Any]:
        true = causal_model.label_counterfactual_data(dataset, group, counterfactual_index)
        return [true[j] for j in _permutation(dataset, seed, "permuted:" + "+".join(group))]

    return labels


def shuffled_source_labels(causal_model: CausalModel, variables: Sequence[str] | str, seed: int = 0,
                           counterfactual_index: int = 0) -> LabelFunction:
    """Pair i's base with ``variables`` interchanged from another pair's counterfactual input."""
    group = _checked_group(causal_model, variables)

    def labels(dataset: CounterfactualDataset) -> list[Any]:
        examples = dataset.to_list()
        other = _permutation(dataset, seed, "shuffled:" + "+".join(group))
        out = []
        for i, example in enumerate(examples):
            source = examples[int(other[i])]["counterfactual_inputs"][counterfactual_index]
            out.append(causal_model.run_interchange(example["input"], {v: source for v in group})[RAW_OUTPUT])
        return out

    return labels


def standard_controls(causal_model: CausalModel, variables: Sequence[str], seed: int = 0,
                      counterfactual_index: int = 0) -> dict[str, LabelFunction]:
    """Both controls for each variable, named ``<kind>:<variable>``."""
    controls: dict[str, LabelFunction] = {}
    for variable in variables:
        controls[f"permuted:{variable}"] = permuted_labels(causal_model, variable, seed, counterfactual_index)
        controls[f"shuffled_source:{variable}"] = shuffled_source_labels(causal_model, variable, seed,
                                                                         counterfactual_index)
    return controls
