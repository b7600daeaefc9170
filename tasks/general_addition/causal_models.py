"""High-level causal models of multi-digit addition (pure Python, no torch).

Two fixed-width addends of ``n_digits`` digits (leading zeros allowed and printed, so
``"05+23="`` is a valid prompt). Variables:

* inputs: ``template`` (a key of :data:`PROMPT_TEMPLATES`) and ``digit_{addend}_{place}`` for
  addend in {0, 1} and place 0 = ones (least significant), domain ``range(10)``.
  For ``"58+67="``: digit_0_1=5, digit_0_0=8, digit_1_1=6, digit_1_0=7.
* ``carry_{place}`` for place 0..D-1: the carry *out of* that place, domain [0, 1].
  ``carry_0 = (digit_0_0 + digit_1_0) >= 10``;
  ``carry_k = (digit_0_k + digit_1_k + carry_{k-1}) >= 10``.
* ``output_digit_{place}`` for place 0..D: ``output_digit_0 = (digit_0_0 + digit_1_0) % 10``,
  ``output_digit_k = (digit_0_k + digit_1_k + carry_{k-1}) % 10`` for 0 < k < D,
  ``output_digit_D = carry_{D-1}`` (domain [0, 1]).
* ``raw_input``: the prompt rendered from ``template`` and the digits (domain None).
* ``raw_output``: ``str(int(sum))`` read off the output digits, no leading zeros
  (``"05+23="`` -> ``"28"``, ``"58+67="`` -> ``"125"``), domain None.

:func:`build_addition_model` is the correct carry algorithm.
:func:`build_tens_without_carry_model` is a competing (wrong) hypothesis with the same
variables, in which ``output_digit_1`` ignores ``carry_0``; it is wrong exactly on inputs
with ``carry_0 = 1``. Both models share variable names, so one set of raw intervention results
can be scored against both and the scores used to rank the hypotheses.
"""

from __future__ import annotations

from typing import Any, Mapping

from causal.causal_model import CausalModel

PROMPT_TEMPLATES: dict[str, str] = {
    "compact": "{a}+{b}=",
    "plus_words": "What is {a} plus {b}? Answer:",
    "qa": "Q: {a}+{b}=? A:",
}
"""Prompt templates; ``{a}`` and ``{b}`` are the zero-padded addends."""

DEFAULT_TEMPLATE = "compact"
"""The organism's prompt format (``"58+67="``)."""

SUPPORTED_DIGITS = (2, 3, 4)
ADDENDS = (0, 1)


def digit_var(addend: int, place: int) -> str:
    """Name of the input variable for ``place`` (0 = ones) of addend ``addend`` (0 or 1)."""
    return f"digit_{addend}_{place}"


def carry_var(place: int) -> str:
    return f"carry_{place}"


def output_digit_var(place: int) -> str:
    return f"output_digit_{place}"


def digit_vars(n_digits: int) -> list[str]:
    """All digit input variables, addend 0 first, most significant place first."""
    return [digit_var(a, p) for a in ADDENDS for p in reversed(range(n_digits))]


def input_vars(n_digits: int) -> list[str]:
    """Input (root) variables: ``template`` then the digits."""
    return ["template", *digit_vars(n_digits)]


def _check_n_digits(n_digits: int) -> None:
    if n_digits not in SUPPORTED_DIGITS:
        raise ValueError(f"n_digits must be one of {SUPPORTED_DIGITS}, got {n_digits!r}")


def _check_templates(templates: list[str] | None) -> list[str]:
    names = list(PROMPT_TEMPLATES) if templates is None else list(templates)
    if not names:
        raise ValueError("templates must be non-empty")
    unknown = [t for t in names if t not in PROMPT_TEMPLATES]
    if unknown:
        raise ValueError(f"unknown template(s) {unknown}; known: {sorted(PROMPT_TEMPLATES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate templates in {names}")
    return names


def _n_digits_of(setting: Mapping[str, Any]) -> int:
    n = 0
    while digit_var(0, n) in setting:
        n += 1
    if n == 0:
        raise ValueError("setting has no digit variables")
    return n


def render_prompt(template: str, a: int, b: int, n_digits: int) -> str:
    """The prompt for addends ``a`` and ``b``, zero-padded to ``n_digits``."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[template].format(a=f"{a:0{n_digits}d}", b=f"{b:0{n_digits}d}")


def addends_of(setting: Mapping[str, Any]) -> tuple[int, int]:
    """The two addends encoded by the digit variables of ``setting``."""
    n = _n_digits_of(setting)
    return tuple(  # type: ignore[return-value]
        sum(int(setting[digit_var(a, p)]) * 10**p for p in range(n)) for a in ADDENDS
    )


def carries_of(a: int, b: int, n_digits: int) -> list[int]:
    """``carry_0 .. carry_{D-1}`` of the true algorithm for addends ``a`` and ``b``."""
    carries, c = [], 0
    for p in range(n_digits):
        c = int((a // 10**p) % 10 + (b // 10**p) % 10 + c >= 10)
        carries.append(c)
    return carries


def setting_from_addends(
    a: int, b: int, n_digits: int, template: str = DEFAULT_TEMPLATE
) -> dict[str, Any]:
    """Input setting (``template``, digits and ``raw_input``) for addends ``a`` and ``b``."""
    _check_n_digits(n_digits)
    for x in (a, b):
        if not 0 <= x < 10**n_digits:
            raise ValueError(f"addend {x} does not fit in {n_digits} digits")
    setting: dict[str, Any] = {"template": template}
    for addend, value in zip(ADDENDS, (a, b)):
        for p in range(n_digits):
            setting[digit_var(addend, p)] = (value // 10**p) % 10
    setting["raw_input"] = render_prompt(template, a, b, n_digits)
    return setting


def _raw_input_mechanism(n_digits: int):
    def mechanism(template: str, *digits: int) -> str:
        # digits in digit_vars(n_digits) order: addend 0 MSB..LSB, then addend 1 MSB..LSB.
        a = int("".join(str(d) for d in digits[:n_digits]))
        b = int("".join(str(d) for d in digits[n_digits:]))
        return render_prompt(template, a, b, n_digits)

    return mechanism


def _raw_output(*output_digits: int) -> str:
    # output_digits in place order 0..D.
    return str(sum(int(d) * 10**p for p, d in enumerate(output_digits)))


def _build(n_digits: int, templates: list[str] | None, tens_uses_carry: bool, id: str) -> CausalModel:
    _check_n_digits(n_digits)
    names = _check_templates(templates)
    default_template = DEFAULT_TEMPLATE if DEFAULT_TEMPLATE in names else names[0]
    D = n_digits

    variables: list[str] = []
    values: dict[str, Any] = {}
    parents: dict[str, list[str]] = {}
    mechanisms: dict[str, Any] = {}

    variables.append("template")
    values["template"] = names
    parents["template"] = []
    mechanisms["template"] = lambda: default_template

    default_addends = (58, 67) if D == 2 else (10 ** (D - 1), 10 ** (D - 1))
    for addend in ADDENDS:
        for p in reversed(range(D)):
            v = digit_var(addend, p)
            variables.append(v)
            values[v] = list(range(10))
            parents[v] = []
            default = (default_addends[addend] // 10**p) % 10
            mechanisms[v] = lambda default=default: default

    for p in range(D):
        c = carry_var(p)
        variables.append(c)
        values[c] = [0, 1]
        if p == 0:
            parents[c] = [digit_var(0, 0), digit_var(1, 0)]
            mechanisms[c] = lambda x, y: int(x + y >= 10)
        else:
            parents[c] = [digit_var(0, p), digit_var(1, p), carry_var(p - 1)]
            mechanisms[c] = lambda x, y, cin: int(x + y + cin >= 10)

    for p in range(D + 1):
        o = output_digit_var(p)
        variables.append(o)
        if p == D:
            values[o] = [0, 1]
            parents[o] = [carry_var(D - 1)]
            mechanisms[o] = lambda cin: cin
        elif p == 0 or (p == 1 and not tens_uses_carry):
            values[o] = list(range(10))
            parents[o] = [digit_var(0, p), digit_var(1, p)]
            mechanisms[o] = lambda x, y: (x + y) % 10
        else:
            values[o] = list(range(10))
            parents[o] = [digit_var(0, p), digit_var(1, p), carry_var(p - 1)]
            mechanisms[o] = lambda x, y, cin: (x + y + cin) % 10

    variables.append("raw_input")
    values["raw_input"] = None
    parents["raw_input"] = input_vars(D)
    mechanisms["raw_input"] = _raw_input_mechanism(D)

    variables.append("raw_output")
    values["raw_output"] = None
    parents["raw_output"] = [output_digit_var(p) for p in range(D + 1)]
    mechanisms["raw_output"] = _raw_output

    return CausalModel(variables, values, parents, mechanisms, id=id)


def build_addition_model(n_digits: int, templates: list[str] | None = None) -> CausalModel:
    """The correct carry algorithm for ``n_digits``-digit addition (id ``addition_{D}d_carry``).

    ``templates`` restricts the ``template`` domain (default: all of :data:`PROMPT_TEMPLATES`);
    the root default is :data:`DEFAULT_TEMPLATE` when allowed.
    """
    return _build(n_digits, templates, True, id=f"addition_{n_digits}d_carry")


def build_tens_without_carry_model(
    n_digits: int, templates: list[str] | None = None
) -> CausalModel:
    """Competing hypothesis (id ``addition_{D}d_tens_no_carry``): same graph and variables as
    :func:`build_addition_model`, except ``output_digit_1 = (digit_0_1 + digit_1_1) % 10``
    ignores ``carry_0``; ``carry_1`` (and everything above) is still computed as in the true graph.

    This model is *wrong*: on every base input with ``carry_0 = 1`` its ``raw_output`` is off
    in the tens digit (e.g. 58+67 -> "115" instead of "125"); on inputs with ``carry_0 = 0`` it
    agrees with the true model. It exists so that one set of raw intervention results can be
    scored against both hypotheses and the scores shown to rank them.
    """
    return _build(n_digits, templates, False, id=f"addition_{n_digits}d_tens_no_carry")
