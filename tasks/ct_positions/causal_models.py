"""Causal models of where a multi-step arithmetic word problem's intermediate results live in six
continuous-thought (CT) slots (pure Python, no torch).

Problem: "Tom has 3 apples. He buys 4 more, then gives away 2, then doubles them. How many
apples does he have now? Answer:" with 2-4 operations.

Variables of ``build_ct_model(n_ops, assignment)``:

* inputs: ``start`` (``range(1, 10)``), ``op_{i}`` in ``{"add", "sub", "mul"}`` and ``arg_{i}``
  (``range(1, 5)``) for i = 1..n_ops;
* ``step_{i}``: the result after operation i, **reduced mod 100** so every value stays in the
  finite domain ``range(100)`` (also under interventions); the samplers only draw problems that
  never wrap (all true intermediate results in 0..99), so on sampled inputs the mod is a no-op;
* ``ct_0`` .. ``ct_5`` (:data:`CT_SLOTS`): each slot copies the step it is assigned to
  (parent: that step), domain ``range(100)``;
* ``answer``: copies the *last* slot assigned to the final step; ``raw_output = str(answer)``;
* ``raw_input``: the rendered word problem.

The chain goes through the slots: ``step_1 = op_1(start, arg_1)`` and
``step_{i+1} = op_{i+1}(reader(step_i), arg_{i+1})`` where ``reader(step_i)`` is the last slot
(highest index) assigned to ``step_i``. So with the default 3-op assignment the graph is
``start -> step_1 -> ct_0, ct_1; ct_1 -> step_2 -> ct_2, ct_3; ct_3 -> step_3 -> ct_4, ct_5;
ct_5 -> answer``: patching a reader slot changes the answer, patching any other slot
(``ct_0``, ``ct_2``, ``ct_4`` here) changes nothing.

Default assignment (:func:`default_assignment`): slots are filled in order, ``min(2, 6 // n_ops)``
slots per step (two per step for n_ops <= 3, one per step for n_ops = 4); remaining slots carry
the final step's result. n_ops=2: ct_0,ct_1 -> step_1; ct_2..ct_5 -> step_2 (answer reads ct_5).
n_ops=3: pairs for step_1..3. n_ops=4: ct_0..ct_3 -> step_1..step_4, ct_4, ct_5 -> step_4.

A custom ``assignment`` maps slot -> step variable. Slots it leaves out are *idle*: they copy
the final step but nothing reads them (the answer reads the last slot explicitly assigned to the
final step). Every step must be carried by at least one slot.
"""

from __future__ import annotations

from typing import Any, Mapping

from causal.causal_model import CausalModel

CT_SLOTS: list[str] = [f"ct_{k}" for k in range(6)]
OPS: list[str] = ["add", "sub", "mul"]
START_VALUES = list(range(1, 10))
ARG_VALUES = list(range(1, 5))
MODULUS = 100
STEP_VALUES = list(range(MODULUS))
SUPPORTED_N_OPS = (2, 3, 4)


def step_var(i: int) -> str:
    return f"step_{i}"


def op_var(i: int) -> str:
    return f"op_{i}"


def arg_var(i: int) -> str:
    return f"arg_{i}"


def input_vars(n_ops: int) -> list[str]:
    """``start``, then ``op_i``, ``arg_i`` for i = 1..n_ops."""
    out = ["start"]
    for i in range(1, n_ops + 1):
        out += [op_var(i), arg_var(i)]
    return out


def apply_op(op: str, value: int, arg: int) -> int:
    """One operation without reduction."""
    if op == "add":
        return value + arg
    if op == "sub":
        return value - arg
    if op == "mul":
        return value * arg
    if op == "div":  # only in generated study problems (``tasks.ct_positions.data``), never in the graph's domain
        if arg == 0 or value % arg:
            raise ValueError(f"div {value} by {arg} is not exact")
        return value // arg
    raise ValueError(f"unknown op {op!r}; known: {OPS} (+ 'div' for generated problems)")


def true_steps(setting: Mapping[str, Any], n_ops: int) -> list[int]:
    """The unreduced step results of a setting (for checking that a problem never wraps)."""
    value, out = int(setting["start"]), []
    for i in range(1, n_ops + 1):
        value = apply_op(setting[op_var(i)], value, int(setting[arg_var(i)]))
        out.append(value)
    return out


def in_range(setting: Mapping[str, Any], n_ops: int) -> bool:
    """Whether every true intermediate result lies in ``range(100)`` (no mod wrap)."""
    return all(0 <= v < MODULUS for v in true_steps(setting, n_ops))


_MUL_WORDS = {2: "doubles them", 3: "triples them", 4: "quadruples them"}
_DIV_WORDS = {2: "keeps half", 3: "keeps a third", 4: "keeps a quarter"}


def _phrase(op: str, arg: int) -> str:
    if op == "add":
        return f"buys {arg} more"
    if op == "sub":
        return f"gives away {arg}"
    if op == "mul":
        return _MUL_WORDS.get(arg, f"multiplies them by {arg}")
    if op == "div":
        return _DIV_WORDS.get(arg, f"divides them by {arg}")
    raise ValueError(f"unknown op {op!r}; known: {OPS}")


def render_problem(start: int, ops: list[str], args: list[int]) -> str:
    """The word problem text."""
    actions = ", then ".join(_phrase(op, arg) for op, arg in zip(ops, args))
    noun = "apple" if start == 1 else "apples"
    return f"Tom has {start} {noun}. He {actions}. How many apples does he have now? Answer:"


def make_setting(start: int, ops: list[str], args: list[int]) -> dict[str, Any]:
    """Input setting (``start``, ``op_i``, ``arg_i``, ``raw_input``)."""
    if len(ops) != len(args):
        raise ValueError("ops and args must have the same length")
    setting: dict[str, Any] = {"start": start}
    for i, (op, arg) in enumerate(zip(ops, args), start=1):
        setting[op_var(i)] = op
        setting[arg_var(i)] = arg
    setting["raw_input"] = render_problem(start, list(ops), list(args))
    return setting


def _check_n_ops(n_ops: int) -> None:
    if n_ops not in SUPPORTED_N_OPS:
        raise ValueError(f"n_ops must be one of {SUPPORTED_N_OPS}, got {n_ops!r}")


def default_assignment(n_ops: int) -> dict[str, str]:
    """Slots in order, ``min(2, 6 // n_ops)`` per step; leftover slots carry the final step."""
    _check_n_ops(n_ops)
    per = min(2, len(CT_SLOTS) // n_ops)
    out: dict[str, str] = {}
    for k, slot in enumerate(CT_SLOTS):
        out[slot] = step_var(min(k // per + 1, n_ops))
    return out


def validate_assignment(n_ops: int, assignment: Mapping[str, str]) -> dict[str, str]:
    """Check slot and step names and that every step is carried; returns a plain dict."""
    _check_n_ops(n_ops)
    steps = [step_var(i) for i in range(1, n_ops + 1)]
    unknown_slots = [s for s in assignment if s not in CT_SLOTS]
    if unknown_slots:
        raise ValueError(f"unknown CT slot(s) {unknown_slots}; known: {CT_SLOTS}")
    unknown_steps = sorted({v for v in assignment.values() if v not in steps})
    if unknown_steps:
        raise ValueError(f"unknown step variable(s) {unknown_steps} for n_ops={n_ops}; known: {steps}")
    uncarried = [s for s in steps if s not in assignment.values()]
    if uncarried:
        raise ValueError(f"step(s) {uncarried} carried by no CT slot")
    return dict(assignment)


def _readers(n_ops: int, assignment: Mapping[str, str]) -> dict[str, str]:
    """step variable -> the slot read downstream (the last slot explicitly assigned to it)."""
    out: dict[str, str] = {}
    for slot in CT_SLOTS:
        if slot in assignment:
            out[assignment[slot]] = slot
    return out


def slot_carrying(model: CausalModel, step_var: str) -> list[str]:
    """The CT slots of ``model`` whose parent is ``step_var`` (in slot order; includes idle slots
    of a partial assignment, which copy the final step)."""
    return [s for s in CT_SLOTS if s in model.parents and list(model.parents[s]) == [step_var]]


def reader_slot(model: CausalModel, step: str) -> str:
    """The slot through which ``step`` reaches the rest of the graph (the next step or answer)."""
    carriers = slot_carrying(model, step)
    for v in model.variables:
        if v.startswith("step_") or v == "answer":
            for p in model.parents[v]:
                if p in carriers:
                    return p
    raise ValueError(f"no slot reading {step!r}")


def build_ct_model(n_ops: int, assignment: dict[str, str] | None = None) -> CausalModel:
    """Causal model of an ``n_ops``-step problem with CT slots assigned per ``assignment``
    (default: :func:`default_assignment`). Id: ``ct_{n_ops}ops_<step index per slot>``,
    e.g. ``ct_3ops_112233`` (``x`` marks an idle slot)."""
    _check_n_ops(n_ops)
    assign = default_assignment(n_ops) if assignment is None else validate_assignment(n_ops, assignment)
    readers = _readers(n_ops, assign)
    final = step_var(n_ops)

    variables: list[str] = []
    values: dict[str, Any] = {}
    parents: dict[str, list[str]] = {}
    mechanisms: dict[str, Any] = {}

    def add(v: str, domain: Any, ps: list[str], mech: Any) -> None:
        variables.append(v)
        values[v] = domain
        parents[v] = ps
        mechanisms[v] = mech

    add("start", START_VALUES, [], lambda: 3)
    default_ops, default_args = ["add", "sub", "mul", "add"], [4, 2, 2, 1]
    for i in range(1, n_ops + 1):
        add(op_var(i), OPS, [], lambda d=default_ops[i - 1]: d)
        add(arg_var(i), ARG_VALUES, [], lambda d=default_args[i - 1]: d)

    def step_mech(prev: int, op: str, arg: int) -> int:
        return apply_op(op, int(prev), int(arg)) % MODULUS

    for i in range(1, n_ops + 1):
        prev = "start" if i == 1 else readers[step_var(i - 1)]
        add(step_var(i), STEP_VALUES, [prev, op_var(i), arg_var(i)], step_mech)
        for slot in CT_SLOTS:
            if assign.get(slot, final) == step_var(i):
                add(slot, STEP_VALUES, [step_var(i)], lambda v: v)

    add("answer", STEP_VALUES, [readers[final]], lambda v: v)

    def raw_input_mech(start: int, *ops_and_args: Any) -> str:
        return render_problem(start, list(ops_and_args[0::2]), list(ops_and_args[1::2]))

    add("raw_input", None, input_vars(n_ops), raw_input_mech)
    add("raw_output", None, ["answer"], lambda a: str(a))

    tag = "".join(assign[s].split("_")[1] if s in assign else "x" for s in CT_SLOTS)
    return CausalModel(variables, values, parents, mechanisms, id=f"ct_{n_ops}ops_{tag}")
