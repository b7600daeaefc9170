"""Answer checker for addition outputs (pure Python)."""

from __future__ import annotations

from typing import Any

from causal.answer_parsing import leading_integer


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
    got = leading_integer(output_text, signed=False)
    return got is not None and got == want
