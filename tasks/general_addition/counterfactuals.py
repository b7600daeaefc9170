"""Counterfactual dataset samplers for the addition task (pure Python, no torch).

Each ``*_sampler(model, n_digits, rng, template=...)`` returns a zero-argument closure for
:meth:`CounterfactualDataset.from_sampler`; one call returns
``{"input": base, "counterfactual_inputs": [counterfactual]}`` where both settings hold the
input variables of the addition models plus ``raw_input``. The counterfactual always keeps the
base's template, so token positions align between base and counterfactual.

Families (see :func:`ADDITION_FAMILIES`):

* ``"random"``: independent random counterfactual.
* ``"change_one_digit"``: copy of the base with one uniformly chosen digit variable changed to a
  different value.
* ``"flip_carry_{k}"`` (k = 0..D-1): ``carry_k`` differs between base and counterfactual
  (independent random pairs, rejection sampled).
* ``"same_sum"``: different digits, same sum (bases whose sum has a single decomposition,
  0 and 2 * (10**D - 1), are resampled).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from causal.causal_model import CausalModel
from causal.counterfactual_dataset import CounterfactualDataset
from tasks.general_addition.causal_models import (
    DEFAULT_TEMPLATE,
    addends_of,
    build_addition_model,
    carries_of,
    digit_vars,
    setting_from_addends,
)

Setting = dict[str, Any]
Sampler = Callable[[], dict[str, Any]]

_MAX_TRIES = 10_000


def ADDITION_FAMILIES(n_digits: int) -> list[str]:  # noqa: N802 (name fixed by the API)
    """Family names for ``n_digits``-digit addition, in a fixed order."""
    return ["random", "change_one_digit", *[f"flip_carry_{k}" for k in range(n_digits)], "same_sum"]


def _check_template(model: CausalModel | None, template: str) -> None:
    if model is not None and template not in model.values["template"]:
        raise ValueError(f"template {template!r} not in the model's domain {model.values['template']}")


def _random_addends(n_digits: int, rng: random.Random) -> tuple[int, int]:
    hi = 10**n_digits - 1
    return rng.randint(0, hi), rng.randint(0, hi)


def _pair(base: Setting, cf: Setting) -> dict[str, Any]:
    return {"input": base, "counterfactual_inputs": [cf]}


def random_sampler(
    model: CausalModel | None, n_digits: int, rng: random.Random, template: str = DEFAULT_TEMPLATE
) -> Sampler:
    """Base and counterfactual drawn independently (same template)."""
    _check_template(model, template)

    def sample() -> dict[str, Any]:
        base = setting_from_addends(*_random_addends(n_digits, rng), n_digits, template)
        cf = setting_from_addends(*_random_addends(n_digits, rng), n_digits, template)
        return _pair(base, cf)

    return sample


def change_one_digit_sampler(
    model: CausalModel | None, n_digits: int, rng: random.Random, template: str = DEFAULT_TEMPLATE
) -> Sampler:
    """Counterfactual = base with one uniformly chosen digit changed to a different value."""
    _check_template(model, template)
    names = digit_vars(n_digits)

    def sample() -> dict[str, Any]:
        base = setting_from_addends(*_random_addends(n_digits, rng), n_digits, template)
        var = rng.choice(names)
        new = rng.choice([d for d in range(10) if d != base[var]])
        edited = dict(base)
        edited[var] = new
        cf = setting_from_addends(*addends_of(edited), n_digits, template)
        return _pair(base, cf)

    return sample


def flip_carry_sampler(
    model: CausalModel | None,
    n_digits: int,
    rng: random.Random,
    k: int,
    template: str = DEFAULT_TEMPLATE,
) -> Sampler:
    """Independent random pairs, rejection sampled until ``carry_k`` differs."""
    _check_template(model, template)
    if not 0 <= k < n_digits:
        raise ValueError(f"carry place {k} out of range for {n_digits} digits")

    def sample() -> dict[str, Any]:
        for _ in range(_MAX_TRIES):
            a, b = _random_addends(n_digits, rng)
            c, d = _random_addends(n_digits, rng)
            if carries_of(a, b, n_digits)[k] != carries_of(c, d, n_digits)[k]:
                return _pair(
                    setting_from_addends(a, b, n_digits, template),
                    setting_from_addends(c, d, n_digits, template),
                )
        raise RuntimeError(f"could not sample a pair with carry_{k} flipped")  # pragma: no cover

    return sample


def same_sum_sampler(
    model: CausalModel | None, n_digits: int, rng: random.Random, template: str = DEFAULT_TEMPLATE
) -> Sampler:
    """Counterfactual with different addends but the same sum."""
    _check_template(model, template)
    hi = 10**n_digits - 1

    def sample() -> dict[str, Any]:
        for _ in range(_MAX_TRIES):
            a, b = _random_addends(n_digits, rng)
            s = a + b
            lo_a, hi_a = max(0, s - hi), min(s, hi)
            if hi_a - lo_a < 1:  # only one decomposition: resample the base
                continue
            c = rng.randint(lo_a, hi_a - 1)
            if c >= a:  # uniform over the allowed first addends other than a
                c += 1
            return _pair(
                setting_from_addends(a, b, n_digits, template),
                setting_from_addends(c, s - c, n_digits, template),
            )
        raise RuntimeError("could not sample a same-sum pair")  # pragma: no cover

    return sample


def make_addition_sampler(
    family: str,
    model: CausalModel | None,
    n_digits: int,
    rng: random.Random,
    template: str = DEFAULT_TEMPLATE,
) -> Sampler:
    """The sampler of one family (a name from :func:`ADDITION_FAMILIES`)."""
    if family == "random":
        return random_sampler(model, n_digits, rng, template)
    if family == "change_one_digit":
        return change_one_digit_sampler(model, n_digits, rng, template)
    if family == "same_sum":
        return same_sum_sampler(model, n_digits, rng, template)
    if family.startswith("flip_carry_") and family in ADDITION_FAMILIES(n_digits):
        return flip_carry_sampler(model, n_digits, rng, int(family.rsplit("_", 1)[1]), template)
    raise ValueError(f"unknown addition family {family!r}; known: {ADDITION_FAMILIES(n_digits)}")


def family_rng(seed: int, family: str, n_digits: int) -> random.Random:
    """The deterministic RNG of one family (string seeds are hashed with SHA-512 by CPython,
    so this does not depend on ``PYTHONHASHSEED``)."""
    return random.Random(f"addition-{n_digits}d-{seed}-{family}")


def make_addition_datasets(
    n_digits: int,
    size: int,
    seed: int,
    families: list[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    model: CausalModel | None = None,
) -> dict[str, CounterfactualDataset]:
    """One dataset of ``size`` pairs per family, keyed and identified by the family name.

    Deterministic under ``seed``: each family draws from its own :func:`family_rng`, so adding or
    removing families does not change the others.
    """
    names = ADDITION_FAMILIES(n_digits) if families is None else list(families)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate families in {names}")
    if model is None:
        model = build_addition_model(n_digits)
    out: dict[str, CounterfactualDataset] = {}
    for family in names:
        sampler = make_addition_sampler(family, model, n_digits, family_rng(seed, family, n_digits), template)
        out[family] = CounterfactualDataset.from_sampler(size, sampler, id=family)
    return out
