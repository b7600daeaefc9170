"""Answer checker for the continuous-thought positions task (pure Python)."""

from __future__ import annotations

from typing import Any

from causal.answer_parsing import leading_integer


def ct_checker(output_text: str, expected: Any) -> bool:
    """Leading integer of the output equals ``str(expected).strip()`` exactly
    (``"14 apples"`` and ``"14\\n"`` pass for 14; ``"1"`` and ``"140"`` do not)."""
    got = leading_integer(output_text)
    return got is not None and got == str(expected).strip()
