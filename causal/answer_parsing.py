"""Reading answers out of generated text, for checkers (pure Python).

A checker sees the whole decoded continuation (e.g. ``" 125\\n"`` or ``"9.8 is larger"``) and
compares the answer at its start; these helpers extract it.
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def leading_integer(text: str, signed: bool = True) -> str | None:
    """The integer at the start of ``text`` (after whitespace), as written; None if there is none.
    With ``signed=False`` a leading minus sign does not count."""
    m = _INTEGER.match(text.lstrip())
    if m is None or (not signed and m.group(0).startswith("-")):
        return None
    return m.group(0)


def leading_number(text: str) -> str | None:
    """The integer or decimal at the start of ``text`` ("9.8" from " 9.8 is larger" or "9.8."); None if none."""
    m = _NUMBER.match(text.lstrip())
    return m.group(0) if m else None
