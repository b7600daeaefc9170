"""High-level causal models of decimal comparison ("Which is bigger: 9.8 or 9.11?").

Variables (shared by both hypotheses, so the same datasets and raw results score against both):

* inputs: ``x``, ``y`` (decimal strings ``"<int>.<frac>"``, see :data:`NUMBERS`) and ``format``
  (a key of ``formats.FORMATS``);
* ``int_x``, ``int_y`` (ints), ``frac_x``, ``frac_y`` (the fractional digit strings as written,
  e.g. ``"8"``, ``"11"``, ``"05"``);
* ``int_cmp``, ``frac_cmp`` in ``{"lt", "eq", "gt"}`` (x relative to y);
* ``raw_input`` (prompt rendered per ``format``), ``raw_output`` (the larger number string,
  ``x`` when the model judges them equal).

:func:`build_numeric_model` compares fractional parts as decimals (0.8 > 0.11), the correct
algorithm. :func:`build_whole_number_fraction_model` is the known failure mode: it compares the
fractional digit strings as whole numbers (11 > 8, so 9.11 > 9.8).

Domains: integer parts 0..20, fractional parts with one or two digits and no trailing zero
(``"1"``..``"9"`` and ``"01"``..``"99"`` not ending in 0): 99 fractional parts, 2079 numbers.
"""

from __future__ import annotations

from typing import Any

from causal.causal_model import CausalModel
from tasks.decimal_comparison.formats import DEFAULT_FORMAT, FORMATS, render

INT_PARTS: list[int] = list(range(21))
FRAC_PARTS: list[str] = [str(d) for d in range(1, 10)] + [
    f"{t}{u}" for t in range(10) for u in range(1, 10)
]
NUMBERS: list[str] = [f"{i}.{f}" for i in INT_PARTS for f in FRAC_PARTS]
_NUMBER_SET = frozenset(NUMBERS)

CMP_VALUES: list[str] = ["lt", "eq", "gt"]


INPUT_VARS = ["x", "y", "format"]


def _cmp(a: Any, b: Any) -> str:
    return "lt" if a < b else "gt" if a > b else "eq"


def split_number(number: str) -> tuple[int, str]:
    """``"9.11"`` -> ``(9, "11")``; raises ValueError outside :data:`NUMBERS`."""
    if number not in _NUMBER_SET:
        raise ValueError(f"{number!r} is not in the decimal comparison domain")
    i, f = number.split(".")
    return int(i), f


def numeric_frac_cmp(fx: str, fy: str) -> str:
    """Compare fractional parts as decimals: ``"8"`` (0.8) is greater than ``"11"`` (0.11)."""
    return _cmp(int(fx.ljust(2, "0")), int(fy.ljust(2, "0")))


def whole_frac_cmp(fx: str, fy: str) -> str:
    """Compare fractional parts as whole numbers: ``"11"`` > ``"8"`` (and ``"01"`` == ``"1"``)."""
    return _cmp(int(fx), int(fy))


def larger(x: str, y: str, int_cmp: str, frac_cmp: str) -> str:
    """The number judged larger (``x`` when judged equal)."""
    if int_cmp == "gt":
        return x
    if int_cmp == "lt":
        return y
    return y if frac_cmp == "lt" else x


def answer_numeric(x: str, y: str) -> str:
    """``raw_output`` of :func:`build_numeric_model` for inputs ``x``, ``y``."""
    (ix, fx), (iy, fy) = split_number(x), split_number(y)
    return larger(x, y, _cmp(ix, iy), numeric_frac_cmp(fx, fy))


def answer_whole(x: str, y: str) -> str:
    """``raw_output`` of :func:`build_whole_number_fraction_model` for inputs ``x``, ``y``."""
    (ix, fx), (iy, fy) = split_number(x), split_number(y)
    return larger(x, y, _cmp(ix, iy), whole_frac_cmp(fx, fy))


def hypotheses_disagree(x: str, y: str) -> bool:
    """Whether the two hypotheses give different ``raw_output`` on (x, y)."""
    return answer_numeric(x, y) != answer_whole(x, y)


def render_prompt(x: str, y: str, format: str) -> str:  # noqa: A002 (variable name)
    """The prompt of (x, y) in ``format`` (see ``formats.py``; chat formats use the plain-text fallback)."""
    return render(x, y, format)


def make_setting(x: str, y: str, format: str = DEFAULT_FORMAT, tokenizer: Any | None = None) -> dict[str, Any]:  # noqa: A002
    """Input setting (``x``, ``y``, ``format``, ``raw_input``); ``tokenizer`` renders chat formats
    with its chat template."""
    split_number(x)
    split_number(y)
    return {"x": x, "y": y, "format": format, "raw_input": render(x, y, format, tokenizer)}


def _build(frac_mechanism, id: str) -> CausalModel:  # noqa: A002
    variables = [
        "x", "y", "format",
        "int_x", "int_y", "frac_x", "frac_y",
        "int_cmp", "frac_cmp",
        "raw_input", "raw_output",
    ]
    values: dict[str, Any] = {
        "x": NUMBERS,
        "y": NUMBERS,
        "format": list(FORMATS),
        "int_x": INT_PARTS,
        "int_y": INT_PARTS,
        "frac_x": FRAC_PARTS,
        "frac_y": FRAC_PARTS,
        "int_cmp": CMP_VALUES,
        "frac_cmp": CMP_VALUES,
        "raw_input": None,
        "raw_output": None,
    }
    parents = {
        "x": [], "y": [], "format": [],
        "int_x": ["x"], "int_y": ["y"], "frac_x": ["x"], "frac_y": ["y"],
        "int_cmp": ["int_x", "int_y"],
        "frac_cmp": ["frac_x", "frac_y"],
        "raw_input": ["x", "y", "format"],
        "raw_output": ["x", "y", "int_cmp", "frac_cmp"],
    }
    mechanisms = {
        "x": lambda: "9.8",
        "y": lambda: "9.11",
        "format": lambda: DEFAULT_FORMAT,
        "int_x": lambda x: int(x.split(".")[0]),
        "int_y": lambda y: int(y.split(".")[0]),
        "frac_x": lambda x: x.split(".")[1],
        "frac_y": lambda y: y.split(".")[1],
        "int_cmp": _cmp,
        "frac_cmp": frac_mechanism,
        "raw_input": render_prompt,
        "raw_output": larger,
    }
    return CausalModel(variables, values, parents, mechanisms, id=id)


def build_numeric_model() -> CausalModel:
    """Correct hypothesis: fractional parts compared as decimals (9.8 > 9.11)."""
    return _build(numeric_frac_cmp, id="decimal_numeric")


def build_whole_number_fraction_model() -> CausalModel:
    """Failure-mode hypothesis: fractional parts compared as whole numbers (9.11 > 9.8)."""
    return _build(whole_frac_cmp, id="decimal_whole_number_fraction")
