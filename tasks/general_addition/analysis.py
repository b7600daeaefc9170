"""Addition-specific pieces of the analysis toolkit (``experiments.analysis``): examples, token roles, labels.

Roles of the prompt tokens (unpadded token indices, for any tokenizer through character offsets):
- ``operator``: the "+" and "=" tokens; ``digits``: every addend token;
- ``place_k``: the tokens of both addends' digit at place k (0 = ones);
- ``carry_digits``: the digits of every place whose column produces a carry (``carry_k = 1``);
  empty when the sum has no carry; ``no_carry_digits``: the digits of the other places.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

from experiments.analysis.task_spec import TaskAnalysis
from experiments.pipeline import LMPipeline
from experiments.token_positions import char_span_token_indices
from tasks.general_addition.causal_models import (
    DEFAULT_TEMPLATE,
    addends_of,
    build_addition_model,
    carries_of,
    setting_from_addends,
)
from tasks.general_addition.checker import addition_checker
from tasks.general_addition.organism import ORGANISM_DIR
from tasks.general_addition.token_positions import addend_spans, addition_token_positions

MAX_NEW_TOKENS = 5
"""Enough for any 2- or 3-digit sum plus EOS."""

_EXAMPLE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=?\s*$")


def n_digits_of(setting: dict[str, Any]) -> int:
    n = 0
    while f"digit_0_{n}" in setting:
        n += 1
    return n


def parse_example(text: str, n_digits: int | None = None) -> dict[str, Any]:
    """``"59+73"`` (or ``"59+73="``) -> the setting, zero-padded to the wider addend (at least 2 digits)."""
    match = _EXAMPLE.match(text)
    if match is None:
        raise ValueError(f"not an addition example: {text!r} (expected e.g. '59+73')")
    a, b = int(match.group(1)), int(match.group(2))
    width = n_digits or max(2, len(match.group(1)), len(match.group(2)))
    return setting_from_addends(a, b, width, DEFAULT_TEMPLATE)


def sample(n: int, seed: int = 0, n_digits: int = 2) -> list[dict[str, Any]]:
    """``n`` random problems (uniform addends, fixed width) from ``seed``."""
    rng = random.Random(seed)
    hi = 10**n_digits - 1
    return [setting_from_addends(rng.randint(0, hi), rng.randint(0, hi), n_digits) for _ in range(n)]


def answer(setting: dict[str, Any]) -> str:
    a, b = addends_of(setting)
    return str(a + b)


def check(output_text: str, setting: dict[str, Any]) -> bool:
    return addition_checker(output_text, answer(setting))


def positions(pipeline: LMPipeline, setting: dict[str, Any]) -> dict[str, int]:
    """Named single-token positions (digits or addends, ``op``, ``eq`` if not last, ``last``)."""
    out = {}
    for pos in addition_token_positions(pipeline, n_digits_of(setting), setting["template"]):
        out[pos.id] = pos.index(setting)[-1]
    return out


def roles(pipeline: LMPipeline, setting: dict[str, Any]) -> dict[str, list[int]]:
    """Token roles of one prompt (see the module docstring)."""
    n = n_digits_of(setting)
    spans = addend_spans(setting, n)
    text = setting["raw_input"]
    a, b = addends_of(setting)
    carries = carries_of(a, b, n)
    place_tokens: dict[int, list[int]] = {p: [] for p in range(n)}
    digits: list[int] = []
    for start, _ in spans:
        for i in range(n):
            place = n - 1 - i
            tokens = char_span_token_indices(pipeline, setting, start + i, start + i + 1)
            place_tokens[place] = sorted(set(place_tokens[place]) | set(tokens))
            digits = sorted(set(digits) | set(tokens))
    operator = []
    for k, ch in enumerate(text):
        if ch in "+=":
            operator.extend(char_span_token_indices(pipeline, setting, k, k + 1))
    out = {"operator": sorted(set(operator) - set(digits)), "digits": digits}
    out.update({f"place_{p}": place_tokens[p] for p in range(n)})
    out["carry_digits"] = sorted({t for p in range(n) if carries[p] for t in place_tokens[p]})
    out["no_carry_digits"] = sorted({t for p in range(n) if not carries[p] for t in place_tokens[p]})
    return out


def labels(settings: Sequence[dict[str, Any]], variable: str) -> list[int]:
    """The value of ``variable`` of the carry model for each setting (ints; the model's domain)."""
    out = []
    models: dict[int, Any] = {}
    for s in settings:
        n = n_digits_of(s)
        model = models.setdefault(n, build_addition_model(n))
        if variable not in model.variables:
            raise ValueError(f"unknown variable {variable!r}; the addition model has {model.variables}")
        value = model.run_forward({k: s[k] for k in s if k in model.variables and not model.parents[k]})[variable]
        out.append(int(value))
    return out


def corrupt(setting: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A problem of the same width whose answer differs in its first token (another sum, same token count)."""
    n = n_digits_of(setting)
    a, b = addends_of(setting)
    want = answer(setting)
    for _ in range(1000):
        c = rng.randint(0, 10**n - 1)
        candidate = setting_from_addends(a, c, n, setting["template"])
        got = answer(candidate)
        if got[0] != want[0] and len(got) == len(want):
            return candidate
    for _ in range(1000):
        c, d = rng.randint(0, 10**n - 1), rng.randint(0, 10**n - 1)
        candidate = setting_from_addends(c, d, n, setting["template"])
        if answer(candidate)[0] != want[0]:
            return candidate
    raise ValueError(f"no corruption found for {setting['raw_input']!r}")


ANALYSIS = TaskAnalysis(
    name="general_addition",
    parse_example=parse_example,
    sample=sample,
    answer=answer,
    check=check,
    positions=positions,
    roles=roles,
    labels=labels,
    corrupt=corrupt,
    probe_variables=("carry_0", "carry_1", "output_digit_0", "output_digit_1"),
    class_variable="carry_0",
    max_new_tokens=MAX_NEW_TOKENS,
    organism=ORGANISM_DIR,
)
