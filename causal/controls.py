"""Control hypotheses: labels false by construction, scored on the same raw results as the real ones.

A sound study locates none of them. Each control is a label function (see `causal.score_labels`):

* :func:`permuted_labels` — a variable's interchange labels permuted among the pairs of each family: the
  label of pair i belongs to another pair's base and source, which the network patched with pair i's
  never sees;
* :func:`shuffled_source_labels` — pair i's base run with the variable taken from *another* pair's
  counterfactual input: a variable whose value the patch does not carry.

Both are seeded and deterministic per (family, seed). A permuted or shuffled label can coincide with the
true label of the pair (few distinct outputs make that common); on such pairs a network that computes the
variable follows the control too. :func:`pairs_where_control_differs` keeps only the pairs where the control's
label differs from the true one, so a control is false by construction on every pair it is scored on.
Torch-free.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

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


def standard_controls(causal_model: CausalModel, groups: Sequence[str | Sequence[str]], seed: int = 0,
                      counterfactual_index: int = 0) -> dict[str, LabelFunction]:
    """Both controls for each variable group (a name, or a list of names interchanged together), named
    ``<kind>:<group>`` with the group's names joined by ``+`` (as `compute_interchange_scores` names groups)."""
    controls: dict[str, LabelFunction] = {}
    for group in groups:
        names = [group] if isinstance(group, str) else list(group)
        name = "+".join(names)
        controls[f"permuted:{name}"] = permuted_labels(causal_model, names, seed, counterfactual_index)
        controls[f"shuffled_source:{name}"] = shuffled_source_labels(causal_model, names, seed, counterfactual_index)
    return controls


def pairs_where_control_differs(control_pairs: pd.DataFrame, true_pairs: pd.DataFrame) -> pd.DataFrame:
    """The rows of a control's per-pair table (``target_variables`` named ``<kind>:<variable>``) whose label
    (``expected``) differs from the true label of the same (variable, dataset, cell, example) in
    ``true_pairs`` (a real hypothesis's per-pair table); raises when a control's variable has no true pairs."""
    keys = ["dataset_id", "cell_id", "example_index"]
    variable = control_pairs["target_variables"].str.split(":", n=1).str[1]
    missing = sorted(set(variable) - set(true_pairs["target_variables"]))
    if missing:
        raise ValueError(f"controls of {missing} have no true labels to compare with")
    true = true_pairs[["target_variables", *keys, "expected"]].rename(
        columns={"target_variables": "_variable", "expected": "_true"})
    joined = control_pairs.assign(_variable=variable.to_numpy()).merge(true, on=["_variable", *keys], how="left",
                                                                       validate="many_to_one")
    keep = joined["expected"].astype(str).to_numpy() != joined["_true"].astype(str).to_numpy()
    return control_pairs[keep].reset_index(drop=True)
