"""Decimal pairs for the bug-rate and patching runs, sampled by stratum (pure Python, no torch).

A stratum is (integer part, fraction lengths of x and y, which of x/y is numerically larger), so
every rate can be broken down by it. ``kind``:

* ``"disagree"`` (default): equal integer parts and fractions on which the numeric and the
  fraction-as-integer rules disagree (e.g. 9.8 vs 9.11). This needs one 1-digit and one 2-digit
  fraction, and the 1-digit one is then always the numerically larger number.
* ``"control"``: different integer parts (both rules agree; the integer parts decide).

``split``: every unordered pair {x, y} is held out with probability 1/10 by a fixed hash
(:func:`is_heldout_pair`); the organism never trained on held-out pairs. ``"heldout"`` samples
only those, ``"train"`` only the others, ``"any"`` both.
"""

from __future__ import annotations

import random
import zlib
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.decimal_comparison.causal_models import (
    FRAC_PARTS,
    INT_PARTS,
    answer_numeric,
    answer_whole,
    hypotheses_disagree,
)

Kind = Literal["disagree", "control"]
Split = Literal["any", "heldout", "train"]
HELDOUT_MODULUS = 10


class DecimalPair(BaseModel):
    """One comparison: ``x`` and ``y`` as written, the correct (numeric) and the buggy
    (fraction-as-integer) answers, and the stratum."""

    model_config = ConfigDict(frozen=True)

    x: str
    y: str
    correct: str
    buggy: str
    int_x: int
    int_y: int
    frac_len_x: int
    frac_len_y: int
    larger: Literal["x", "y"]
    kind: Kind

    @property
    def stratum(self) -> dict[str, object]:
        return {"int_part": self.int_x if self.int_x == self.int_y else None,
                "frac_lengths": f"{self.frac_len_x}{self.frac_len_y}", "larger": self.larger}


def is_heldout_pair(x: str, y: str) -> bool:
    """Whether the unordered pair {x, y} is in the held-out tenth (a fixed CRC32 hash)."""
    a, b = sorted((x, y))
    return zlib.crc32(f"{a}|{b}".encode()) % HELDOUT_MODULUS == 0


def make_pair(x: str, y: str) -> DecimalPair:
    ix, fx = x.split(".")
    iy, fy = y.split(".")
    correct = answer_numeric(x, y)
    kind: Kind = "disagree" if hypotheses_disagree(x, y) else "control"
    return DecimalPair(x=x, y=y, correct=correct, buggy=answer_whole(x, y), int_x=int(ix), int_y=int(iy),
                       frac_len_x=len(fx), frac_len_y=len(fy), larger="x" if correct == x else "y", kind=kind)


def _in_split(x: str, y: str, split: Split) -> bool:
    if split == "any":
        return True
    return is_heldout_pair(x, y) == (split == "heldout")


def sample_pairs(
    n: int,
    seed: int = 0,
    kind: Kind = "disagree",
    int_parts: list[int] | None = None,
    larger: Literal["x", "y"] | None = None,
    split: Split = "any",
    exclude: set[tuple[str, str]] | None = None,
) -> list[DecimalPair]:
    """``n`` distinct pairs, strata cycled in a fixed order (integer part × which is larger), so any
    ``n`` is as balanced as it can be. ``exclude``: (x, y) pairs not to sample (e.g. another split)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ints = list(INT_PARTS if int_parts is None else int_parts)
    bad = [i for i in ints if i not in INT_PARTS]
    if bad or not ints:
        raise ValueError(f"integer parts must be a non-empty subset of {INT_PARTS[0]}..{INT_PARTS[-1]}, got {ints}")
    sides = ["x", "y"] if larger is None else [larger]
    rng = random.Random(f"decimal-pairs-{seed}-{kind}-{split}")
    strata = [(i, s) for i in ints for s in sides]
    rng.shuffle(strata)
    short = [f for f in FRAC_PARTS if len(f) == 1]
    long = [f for f in FRAC_PARTS if len(f) == 2]
    seen: set[tuple[str, str]] = set(exclude or ())
    out: list[DecimalPair] = []
    misses = 0
    while len(out) < n:
        i, side = strata[len(out) % len(strata)] if misses < 200 else rng.choice(strata)
        if kind == "disagree":
            a, b = f"{i}.{rng.choice(short)}", f"{i}.{rng.choice(long)}"
            if not hypotheses_disagree(a, b):
                continue
            x, y = (a, b) if side == "x" else (b, a)  # the short fraction is the larger number
        else:
            j = rng.choice([k for k in INT_PARTS if k != i])
            hi, lo = (i, j) if i > j else (j, i)
            a, b = f"{hi}.{rng.choice(FRAC_PARTS)}", f"{lo}.{rng.choice(FRAC_PARTS)}"
            x, y = (a, b) if side == "x" else (b, a)
        if (x, y) in seen or not _in_split(x, y, split):
            misses += 1
            if misses > 100_000:
                raise RuntimeError(f"could not sample {n} distinct {kind} pairs (got {len(out)})")
            continue
        seen.add((x, y))
        out.append(make_pair(x, y))
    return out
