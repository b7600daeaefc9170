"""Answer checker for decimal comparison outputs (pure Python)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

_LEADING_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def leading_number(text: str) -> str | None:
    """The number at the start of ``text`` (after whitespace), e.g. ``"9.8"`` from
    ``" 9.8 is larger"`` or ``"9.8."``; None when the output does not start with a number."""
    m = _LEADING_NUMBER.match(text.lstrip())
    return m.group(0) if m else None


def decimal_checker(output_text: str, expected: Any) -> bool:
    """True when the leading number of the output equals ``expected``: as a string after strip,
    or numerically (``"9.80"`` is accepted for ``"9.8"``; ``"9.1"`` is not for ``"9.11"``)."""
    want = str(expected).strip()
    got = leading_number(output_text)
    if got is None:
        return False
    if got == want:
        return True
    try:
        return Decimal(got) == Decimal(want)
    except InvalidOperation:
        return False
