"""Answer checker for addition outputs (pure Python)."""

from __future__ import annotations

import re
from typing import Any

_LEADING_INT = re.compile(r"\d+")


def leading_integer(text: str) -> str | None:
    """The run of digits at the start of ``text`` (after leading whitespace), or None."""
    m = _LEADING_INT.match(text.lstrip())
    return m.group(0) if m else None


def addition_checker(output_text: str, expected: Any) -> bool:
    """Whole-answer exact match.

    True when ``output_text.strip() == str(expected).strip()``, or when the leading integer of
    the output (the digits before the first non-digit character, e.g. ``"125\\n..."`` or
    ``"125 "``) equals the expected string. Never a first-character-only comparison: ``"12"``
    and ``"1250"`` are both wrong for ``"125"``.
    """
    want = str(expected).strip()
    if output_text.strip() == want:
        return True
    got = leading_integer(output_text)
    return got is not None and got == want
