"""Counterfactual dataset samplers for decimal comparison (pure Python, no torch).

Each ``*_sampler(model, rng, format=...)`` returns a zero-argument closure for
:meth:`CounterfactualDataset.from_sampler` returning
``{"input": base, "counterfactual_inputs": [counterfactual]}``; settings hold ``x``, ``y``,
``format`` and ``raw_input``. The counterfactual keeps the base's format. No sampled setting
asks to compare a number with itself (``x != y`` always).

Families (:data:`DECIMAL_FAMILIES`):

* ``"random"``: independent random base and counterfactual.
* ``"disagreement"``: base and counterfactual are both inputs on which the numeric and the
  whole-number-fraction hypotheses give different answers (so the integer parts are equal).
* ``"change_frac"``: the base has equal integer parts (so the fractional comparison decides the
  answer) and a strict ``frac_cmp``; the counterfactual changes the fractional part of one
  number (chosen uniformly) so that ``frac_cmp`` *under the given model* flips (``"lt"`` <->
  ``"gt"``).
* ``"change_int"``: random base; the counterfactual changes the integer part of one number
  (chosen uniformly) so that ``int_cmp`` differs (it may become ``"eq"``).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from causal.causal_model import CausalModel
from causal.counterfactual_dataset import CounterfactualDataset
from tasks.decimal_comparison.causal_models import (
    DEFAULT_FORMAT,
    FORMATS,
    FRAC_PARTS,
    INT_PARTS,
    NUMBERS,
    _cmp,
    build_numeric_model,
    hypotheses_disagree,
    make_setting,
    split_number,
)

Sampler = Callable[[], dict[str, Any]]

DECIMAL_FAMILIES: list[str] = ["random", "disagreement", "change_frac", "change_int"]

_MAX_TRIES = 10_000


def _check_format(format: str) -> None:  # noqa: A002
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known: {sorted(FORMATS)}")


def _pair(base: dict[str, Any], cf: dict[str, Any]) -> dict[str, Any]:
    return {"input": base, "counterfactual_inputs": [cf]}


def random_sampler(model: CausalModel | None, rng: random.Random, format: str = DEFAULT_FORMAT) -> Sampler:  # noqa: A002
    _check_format(format)

    def sample() -> dict[str, Any]:
        base = make_setting(*_distinct_pair(rng), format)
        cf = make_setting(*_distinct_pair(rng), format)
        return _pair(base, cf)

    return sample


def _disagreeing(rng: random.Random, format: str) -> dict[str, Any]:  # noqa: A002
    for _ in range(_MAX_TRIES):
        i = rng.choice(INT_PARTS)
        x, y = f"{i}.{rng.choice(FRAC_PARTS)}", f"{i}.{rng.choice(FRAC_PARTS)}"
        if hypotheses_disagree(x, y):
            return make_setting(x, y, format)
    raise RuntimeError("could not sample a disagreeing input")  # pragma: no cover


def disagreement_sampler(model: CausalModel | None, rng: random.Random, format: str = DEFAULT_FORMAT) -> Sampler:  # noqa: A002
    _check_format(format)

    def sample() -> dict[str, Any]:
        return _pair(_disagreeing(rng, format), _disagreeing(rng, format))

    return sample


def _distinct_pair(rng: random.Random) -> tuple[str, str]:
    while True:
        x, y = rng.choice(NUMBERS), rng.choice(NUMBERS)
        if x != y:
            return x, y


def change_frac_sampler(model: CausalModel | None, rng: random.Random, format: str = DEFAULT_FORMAT) -> Sampler:  # noqa: A002
    """``frac_cmp`` is computed with ``model`` (default: the numeric model); it flips strictly
    (``"lt"`` <-> ``"gt"``)."""
    _check_format(format)
    model = build_numeric_model() if model is None else model
    flipped = {"lt": "gt", "gt": "lt"}

    frac_cmp = model.mechanisms["frac_cmp"]  # parents: frac_x, frac_y

    def sample() -> dict[str, Any]:
        for _ in range(_MAX_TRIES):
            i = rng.choice(INT_PARTS)
            fx, fy = rng.choice(FRAC_PARTS), rng.choice(FRAC_PARTS)
            base_cmp = frac_cmp(fx, fy)
            if base_cmp not in flipped:
                continue
            if rng.random() < 0.5:
                options = [(f, fy) for f in FRAC_PARTS if frac_cmp(f, fy) == flipped[base_cmp]]
            else:
                options = [(fx, f) for f in FRAC_PARTS if frac_cmp(fx, f) == flipped[base_cmp]]
            if options:
                cx, cy = rng.choice(options)
                return _pair(
                    make_setting(f"{i}.{fx}", f"{i}.{fy}", format),
                    make_setting(f"{i}.{cx}", f"{i}.{cy}", format),
                )
        raise RuntimeError("could not sample a change_frac pair")  # pragma: no cover

    return sample


def change_int_sampler(model: CausalModel | None, rng: random.Random, format: str = DEFAULT_FORMAT) -> Sampler:  # noqa: A002
    _check_format(format)

    def sample() -> dict[str, Any]:
        for _ in range(_MAX_TRIES):
            x, y = _distinct_pair(rng)
            (ix, fx), (iy, fy) = split_number(x), split_number(y)
            base_cmp = _cmp(ix, iy)
            if rng.random() < 0.5:
                choices = [i for i in INT_PARTS if _cmp(i, iy) != base_cmp]
                cx, cy = f"{rng.choice(choices)}.{fx}", y
            else:
                choices = [i for i in INT_PARTS if _cmp(ix, i) != base_cmp]
                cx, cy = x, f"{rng.choice(choices)}.{fy}"
            if cx != cy:
                return _pair(make_setting(x, y, format), make_setting(cx, cy, format))
        raise RuntimeError("could not sample a change_int pair")  # pragma: no cover

    return sample


_SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "random": random_sampler,
    "disagreement": disagreement_sampler,
    "change_frac": change_frac_sampler,
    "change_int": change_int_sampler,
}


def make_decimal_sampler(
    family: str, model: CausalModel | None, rng: random.Random, format: str = DEFAULT_FORMAT  # noqa: A002
) -> Sampler:
    if family not in _SAMPLERS:
        raise ValueError(f"unknown decimal family {family!r}; known: {DECIMAL_FAMILIES}")
    return _SAMPLERS[family](model, rng, format)


def family_rng(seed: int, family: str) -> random.Random:
    """Deterministic per-family RNG (CPython hashes string seeds with SHA-512). The format is
    not part of the seed, so one seed gives the same numbers under every format."""
    return random.Random(f"decimal-{seed}-{family}")


def make_decimal_datasets(
    size: int,
    seed: int,
    families: list[str] | None = None,
    format: str = DEFAULT_FORMAT,  # noqa: A002
    model: CausalModel | None = None,
) -> dict[str, CounterfactualDataset]:
    """One dataset of ``size`` pairs per family, keyed and identified by the family name.

    ``model`` (default: the numeric model) is only used by ``"change_frac"`` to decide which
    counterfactuals flip ``frac_cmp``.
    """
    names = list(DECIMAL_FAMILIES) if families is None else list(families)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate families in {names}")
    out: dict[str, CounterfactualDataset] = {}
    for family in names:
        sampler = make_decimal_sampler(family, model, family_rng(seed, family), format)
        out[family] = CounterfactualDataset.from_sampler(size, sampler, id=family)
    return out
