"""Counterfactual dataset samplers for the continuous-thought positions task (pure Python).

Every sampled setting (base and counterfactual) is a problem that never wraps: all true
intermediate results lie in 0..99, so the models' mod-100 reduction is a no-op on sampled data.
Settings hold ``start``, ``op_i``, ``arg_i`` and ``raw_input``.

Families (:func:`CT_FAMILIES`):

* ``"random"``: independent random base and counterfactual.
* ``"change_step_{i}"`` (i = 1..n_ops): the counterfactual is the base with one input at or
  before step i (``start``, or ``op_j`` / ``arg_j`` with j <= i, chosen uniformly) changed to a
  different value, such that ``step_i`` differs from the base's.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from causal.counterfactual_dataset import CounterfactualDataset
from tasks.ct_positions.causal_models import (
    ARG_VALUES,
    OPS,
    START_VALUES,
    _check_n_ops,
    arg_var,
    in_range,
    make_setting,
    op_var,
    true_steps,
)

Sampler = Callable[[], dict[str, Any]]

_MAX_TRIES = 10_000


def CT_FAMILIES(n_ops: int) -> list[str]:  # noqa: N802 (name fixed by the API)
    _check_n_ops(n_ops)
    return ["random", *[f"change_step_{i}" for i in range(1, n_ops + 1)]]


def _from_inputs(inputs: dict[str, Any], n_ops: int) -> dict[str, Any]:
    return make_setting(
        inputs["start"],
        [inputs[op_var(i)] for i in range(1, n_ops + 1)],
        [inputs[arg_var(i)] for i in range(1, n_ops + 1)],
    )


def sample_problem(n_ops: int, rng: random.Random) -> dict[str, Any]:
    """A uniformly random problem among those that never wrap."""
    for _ in range(_MAX_TRIES):
        s = make_setting(
            rng.choice(START_VALUES),
            [rng.choice(OPS) for _ in range(n_ops)],
            [rng.choice(ARG_VALUES) for _ in range(n_ops)],
        )
        if in_range(s, n_ops):
            return s
    raise RuntimeError("could not sample an in-range problem")  # pragma: no cover


def random_sampler(n_ops: int, rng: random.Random) -> Sampler:
    _check_n_ops(n_ops)

    def sample() -> dict[str, Any]:
        return {"input": sample_problem(n_ops, rng), "counterfactual_inputs": [sample_problem(n_ops, rng)]}

    return sample


def _domain(var: str) -> list[Any]:
    if var == "start":
        return START_VALUES
    return OPS if var.startswith("op_") else ARG_VALUES


def change_step_sampler(n_ops: int, rng: random.Random, i: int) -> Sampler:
    _check_n_ops(n_ops)
    if not 1 <= i <= n_ops:
        raise ValueError(f"step {i} out of range for n_ops={n_ops}")
    editable = ["start"] + [v for j in range(1, i + 1) for v in (op_var(j), arg_var(j))]

    def sample() -> dict[str, Any]:
        for _ in range(_MAX_TRIES):
            base = sample_problem(n_ops, rng)
            base_step = true_steps(base, n_ops)[i - 1]
            for _ in range(50):
                var = rng.choice(editable)
                new = rng.choice([v for v in _domain(var) if v != base[var]])
                edited = dict(base)
                edited[var] = new
                cf = _from_inputs(edited, n_ops)
                if in_range(cf, n_ops) and true_steps(cf, n_ops)[i - 1] != base_step:
                    return {"input": base, "counterfactual_inputs": [cf]}
        raise RuntimeError(f"could not sample a change_step_{i} pair")  # pragma: no cover

    return sample


def make_ct_sampler(family: str, n_ops: int, rng: random.Random) -> Sampler:
    if family == "random":
        return random_sampler(n_ops, rng)
    if family in CT_FAMILIES(n_ops) and family.startswith("change_step_"):
        return change_step_sampler(n_ops, rng, int(family.rsplit("_", 1)[1]))
    raise ValueError(f"unknown CT family {family!r}; known: {CT_FAMILIES(n_ops)}")


def family_rng(seed: int, family: str, n_ops: int) -> random.Random:
    """Deterministic per-family RNG (CPython hashes string seeds with SHA-512)."""
    return random.Random(f"ct-{n_ops}ops-{seed}-{family}")


def make_ct_datasets(
    n_ops: int, size: int, seed: int, families: list[str] | None = None
) -> dict[str, CounterfactualDataset]:
    """One dataset of ``size`` pairs per family, keyed and identified by the family name.
    The data do not depend on the CT assignment, so one dataset serves every assignment."""
    names = CT_FAMILIES(n_ops) if families is None else list(families)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate families in {names}")
    return {
        family: CounterfactualDataset.from_sampler(
            size, make_ct_sampler(family, n_ops, family_rng(seed, family, n_ops)), id=family
        )
        for family in names
    }
