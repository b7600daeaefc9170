"""Answer checker for decimal comparison outputs (pure Python)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from causal.answer_parsing import leading_number


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
