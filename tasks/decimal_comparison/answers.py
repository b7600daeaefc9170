"""Reading which number a model chose out of its answer text (pure Python).

:func:`chosen_number` returns ``x`` or ``y`` (as written in the prompt) or None:

1. the number at the start of the answer (``" 9.8"``, ``"9.80 is bigger"``, ``"**9.11**"``);
2. else ``"<n> is bigger/larger/greater"``;
3. else ``"bigger/larger/greater (number) is <n>"`` / ``"the answer is <n>"``.

A number counts as ``x`` or ``y`` when it equals it numerically (``"9.80"`` = ``"9.8"``, but ``"9.1"`` is
not ``"9.11"``). :func:`classify_answer` maps the choice to ``correct`` (the numerically larger),
``buggy`` (the fraction-as-integer answer) or ``unparseable`` (no choice found, or one that is neither).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

Outcome = Literal["correct", "buggy", "unparseable"]
OUTCOMES: tuple[Outcome, ...] = ("correct", "buggy", "unparseable")

_NUM = r"(\d+(?:\.\d+)?)"
_LEADING = re.compile(r"^[\s*_`\"'(]*" + _NUM)
_IS_BIGGER = re.compile(_NUM + r"[*_`\"')]*\s+is\s+(?:the\s+)?(?:bigger|larger|greater)", re.IGNORECASE)
_BIGGER_IS = re.compile(
    r"(?:bigger|larger|greater)(?:\s+(?:number|one|value|decimal))?\s+is:?\s*[*_`\"'(]*" + _NUM
    + r"|answer\s+is:?\s*[*_`\"'(]*" + _NUM,
    re.IGNORECASE,
)


def _same(a: str, b: str) -> bool:
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def _match(number: str, x: str, y: str) -> str | None:
    for candidate in (x, y):
        if _same(number, candidate):
            return candidate
    return None


def chosen_number(text: str, x: str, y: str) -> str | None:
    """``x`` or ``y`` as the answer's choice, or None when the text names neither (see module doc)."""
    m = _LEADING.match(text)
    if m:
        return _match(m.group(1), x, y)
    m = _IS_BIGGER.search(text)
    if m:
        return _match(m.group(1), x, y)
    m = _BIGGER_IS.search(text)
    if m:
        return _match(m.group(1) or m.group(2), x, y)
    return None


def classify_answer(text: str, x: str, y: str, correct: str, buggy: str) -> Outcome:
    """``correct`` / ``buggy`` / ``unparseable`` for one answer to "which is bigger: x or y"."""
    choice = chosen_number(text, x, y)
    if choice is None:
        return "unparseable"
    if choice == correct:
        return "correct"
    if choice == buggy:
        return "buggy"
    return "unparseable"  # pragma: no cover (x, y are always the correct or the buggy answer)


def outcome_checker(outcome: Outcome):
    """A checker ``(output_text, pair_dict) -> bool`` true when the answer has ``outcome`` (for raw results
    whose expected value is the pair)."""
    def check(output_text: str, pair: dict) -> bool:
        return classify_answer(output_text, pair["x"], pair["y"], pair["correct"], pair["buggy"]) == outcome

    return check
