"""Problem sets for the CT study: GSM8K-format JSONL and templated multi-step word problems.

Every problem is a :class:`Problem` record (``problem_id``, ``question``, ``gold`` as a string number,
``intermediates``: the results of the steps before the last, ``ops``: the operation of each step).
Generated problems also keep the structure (``start``, ``args``) so the taxonomy can recompute a
chain with one operation reversed, and their ``question`` is exactly
:func:`tasks.ct_positions.causal_models.render_problem`, so problems without division feed the CT
causal model unchanged (:meth:`Problem.setting`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.ct_positions.causal_models import (
    ARG_VALUES,
    MODULUS,
    START_VALUES,
    apply_op,
    make_setting,
    render_problem,
)

ALL_OPS: tuple[str, ...] = ("add", "sub", "mul", "div")
GRAPH_OPS: tuple[str, ...] = ("add", "sub", "mul")
_CALC = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_OP_SYMBOL = {"+": "add", "-": "sub", "*": "mul", "/": "div"}


class Problem(BaseModel):
    """One benchmark problem; ``gold`` and ``intermediates`` are numbers written as strings."""

    problem_id: str
    question: str
    gold: str
    intermediates: list[str] = Field(default_factory=list)
    ops: list[str] = Field(default_factory=list)
    start: int | None = None
    args: list[int] | None = None
    source: str = "generated"

    @property
    def n_ops(self) -> int:
        return len(self.ops)

    def setting(self) -> dict[str, Any]:
        """Input setting of the CT causal model (generated problems without division only)."""
        if self.start is None or self.args is None or any(op not in GRAPH_OPS for op in self.ops):
            raise ValueError(f"problem {self.problem_id} is not in the CT causal model's domain")
        return make_setting(self.start, list(self.ops), list(self.args))


# ---------------------------------------------------------------------------- generated problems
def chain(start: int, ops: list[str], args: list[int]) -> list[int]:
    """Result after each operation (exact; raises on inexact division)."""
    value, out = start, []
    for op, arg in zip(ops, args):
        value = apply_op(op, value, arg)
        out.append(value)
    return out


def _valid(start: int, ops: list[str], args: list[int]) -> bool:
    value = start
    for op, arg in zip(ops, args):
        if op == "div" and (arg < 2 or value % arg):
            return False
        value = apply_op(op, value, arg)
        if not 0 <= value < MODULUS:
            return False
    return True


_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
STYLES = ("words", "compact")


def render_compact(start: int, ops: list[str], args: list[int]) -> str:
    """The compact rendering the organism reads: ``"7+4-2*3/2="`` (left to right, one operation per step)."""
    return f"{start}" + "".join(f"{_SYMBOLS[op]}{arg}" for op, arg in zip(ops, args)) + "="


def render(start: int, ops: list[str], args: list[int], style: str = "words") -> str:
    """``"words"``: the CT causal model's word problem; ``"compact"``: :func:`render_compact`."""
    if style == "words":
        return render_problem(start, list(ops), list(args))
    if style == "compact":
        return render_compact(start, list(ops), list(args))
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def problem_from_structure(start: int, ops: list[str], args: list[int], problem_id: str,
                           style: str = "words") -> Problem:
    steps = chain(start, ops, args)
    return Problem(problem_id=problem_id, question=render(start, ops, args, style), gold=str(steps[-1]),
                   intermediates=[str(v) for v in steps[:-1]], ops=list(ops), start=start, args=list(args))


def sample_structure(rng: random.Random, n_ops: int, ops: tuple[str, ...] = ALL_OPS) -> tuple[int, list[str], list[int]]:
    """A random problem whose every intermediate lies in 0..99 and whose divisions are exact."""
    for _ in range(10_000):
        start = rng.choice(START_VALUES)
        chosen = [rng.choice(ops) for _ in range(n_ops)]
        args = [rng.choice(ARG_VALUES) for _ in range(n_ops)]
        if _valid(start, chosen, args):
            return start, chosen, args
    raise RuntimeError("could not sample a valid problem")  # pragma: no cover


def is_heldout(start: int, ops: list[str], args: list[int], fraction: float = 0.1) -> bool:
    """Deterministic held-out split by a hash of the problem structure (same split for every style)."""
    digest = hashlib.sha256(render_compact(start, ops, args).encode()).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


def generate_problems(n: int, seed: int = 0, n_ops: tuple[int, ...] = (2, 3, 4), ops: tuple[str, ...] = ALL_OPS,
                      split: str = "heldout", heldout_fraction: float = 0.1, style: str = "words") -> list[Problem]:
    """``n`` distinct problems (n_ops drawn uniformly) from the ``split`` ("heldout", "train" or "all"),
    rendered in ``style``."""
    if split not in ("heldout", "train", "all"):
        raise ValueError(f"split must be 'heldout', 'train' or 'all', got {split!r}")
    rng = random.Random(f"ct-problems-{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        start, chosen, args = sample_structure(rng, rng.choice(n_ops), ops)
        question = render(start, chosen, args, style)
        held = is_heldout(start, chosen, args, heldout_fraction)
        if question in seen or (split == "heldout" and not held) or (split == "train" and held):
            continue
        seen.add(question)
        out.append(problem_from_structure(start, chosen, args, f"gen-{seed}-{len(out):05d}", style))
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct problems in split {split!r} (asked for {n})")
    return out


# ---------------------------------------------------------------------------- GSM8K format
def parse_number(text: str) -> str | None:
    """A number written with optional commas/sign/decimals as a canonical string ("1,000" -> "1000", "3.50" -> "3.5")."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return format_number(value)


def format_number(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def gsm8k_problem(record: dict[str, Any], index: int) -> Problem:
    """A GSM8K record (``question``, ``answer`` ending in ``#### N``); calculator annotations
    ``<<a*b=c>>`` give the intermediate results and the operations."""
    for key in ("question", "answer"):
        if key not in record:
            raise ValueError(f"GSM8K record {index} has no {key!r} field (has {sorted(record)})")
    answer = str(record["answer"])
    if "####" not in answer:
        raise ValueError(f"GSM8K record {index}: answer has no '#### N' line")
    gold = parse_number(answer.rsplit("####", 1)[1])
    if gold is None:
        raise ValueError(f"GSM8K record {index}: cannot parse the gold answer {answer.rsplit('####', 1)[1]!r}")
    results, ops = [], []
    for expression, result in _CALC.findall(answer):
        value = parse_number(result)
        if value is not None:
            results.append(value)
        found = [_OP_SYMBOL[c] for c in expression if c in _OP_SYMBOL]
        ops.append(found[0] if found else "other")
    intermediates = [r for r in results if r != gold] if results else []
    return Problem(problem_id=str(record.get("id", f"gsm8k-{index:05d}")), question=str(record["question"]),
                   gold=gold, intermediates=intermediates, ops=ops, source="gsm8k")


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Problems from a GSM8K-format JSONL file (one JSON object per line)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GSM8K file {path} not found")
    out = []
    for index, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            out.append(gsm8k_problem(json.loads(line), index))
        if limit is not None and len(out) >= limit:
            break
    return out
