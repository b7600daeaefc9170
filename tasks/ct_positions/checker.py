"""Answer checker for the continuous-thought positions task (pure Python)."""

from __future__ import annotations

import re
from typing import Any

_LEADING_INT = re.compile(r"-?\d+")


def leading_integer(text: str) -> str | None:
    """The integer at the start of ``text`` (after whitespace), or None."""
    m = _LEADING_INT.match(text.lstrip())
    return m.group(0) if m else None


def ct_checker(output_text: str, expected: Any) -> bool:
    """Leading integer of the output equals ``str(expected).strip()`` exactly
    (``"14 apples"`` and ``"14\\n"`` pass for 14; ``"1"`` and ``"140"`` do not)."""
    got = leading_integer(output_text)
    return got is not None and got == str(expected).strip()
