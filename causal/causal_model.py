"""`CausalModel`: a finite structural causal model of an algorithm. Torch-free.

A model is a DAG of named variables. Each variable has a domain (``values[v]``: a finite
sequence; a `StructuredValues` predicate for structured or unbounded values that must still be
checked; or ``None`` for free text), a list of parents, and a mechanism. Root (input) variables' mechanisms take no arguments and return a default
value; other mechanisms take their parents' values positionally, in ``parents[v]`` order.

By convention ``raw_input`` is the prompt string (computed from the inputs, e.g. from a
``template`` input variable) and ``raw_output`` the expected answer string.

Interventions clamp variables to given values (`run_forward`); interchange interventions
clamp variables to the values they take on counterfactual inputs (`run_interchange`).
An input variable is interchanged like any other: ``run_interchange(base, {"a": cf})`` runs the base
input with ``a`` clamped to ``cf["a"]`` (the base input's own ``a`` is overridden), and every
descendant of ``a`` is recomputed from the clamped value — no wrapper node is needed.
A key of the form ``"a<-b"`` copies the counterfactual run's variable ``b`` into the base
run's variable ``a``.
"""

from __future__ import annotations

import inspect
import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

RAW_INPUT = "raw_input"
RAW_OUTPUT = "raw_output"
ARROW = "<-"
MAX_SAMPLING_TRIES = 10_000


def parse_target(key: str) -> tuple[str, str]:
    """``"a<-b"`` -> ``("a", "b")``; ``"a"`` -> ``("a", "a")``: (base variable, counterfactual variable)."""
    if not isinstance(key, str):
        raise ValueError(f"intervention key {key!r} is not a string")
    if ARROW in key:
        left, _, right = key.partition(ARROW)
        left, right = left.strip(), right.strip()
        if not left or not right or ARROW in right:
            raise ValueError(f"malformed arrow key {key!r}: expected 'base_variable<-counterfactual_variable'")
        return left, right
    return key.strip(), key.strip()


def resolve_rng(rng: random.Random | int | None) -> Any:
    """An int seeds a fresh ``random.Random``; ``None`` is the ``random`` module's global generator."""
    if rng is None:
        return random
    if isinstance(rng, bool):
        raise TypeError("rng must be a random.Random, an int seed, or None")
    if isinstance(rng, int):
        return random.Random(rng)
    if isinstance(rng, random.Random):
        return rng
    raise TypeError(f"rng must be a random.Random, an int seed, or None (got {type(rng).__name__})")


def _check_arity(var: str, mechanism: Callable[..., Any], n_parents: int) -> None:
    try:
        signature = inspect.signature(mechanism)
    except (TypeError, ValueError):  # some builtins have no introspectable signature
        return
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    required = sum(1 for p in positional if p.default is inspect.Parameter.empty)
    has_varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values())
    required_kwonly = [
        p.name
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
    ]
    ok = required <= n_parents and (has_varargs or n_parents <= len(positional)) and not required_kwonly
    if not ok:
        what = "no arguments (it is an input variable)" if n_parents == 0 else f"{n_parents} positional argument(s)"
        raise ValueError(
            f"mechanism of variable {var!r} has signature {signature} but must accept {what}: "
            f"one per parent, in the order of parents[{var!r}]"
        )



class MechanismError(ValueError):
    """A mechanism raised while running the model; the message names the variable (and the example)."""

class StructuredValues:
    """The domain of a variable whose values are structured (tuples, dicts, lists, …) or unbounded but still
    checkable: ``values={"pair": StructuredValues(lambda v: isinstance(v, tuple) and len(v) == 2, "digit pairs")}``.
    Every value the variable takes (given, interchanged or computed) must satisfy ``predicate``; like ``None``,
    it is not finite, so the variable is never sampled from its domain."""

    __slots__ = ("predicate", "description")

    def __init__(self, predicate: Callable[[Any], bool], description: str):
        if not callable(predicate):
            raise ValueError("StructuredValues needs a callable predicate")
        self.predicate, self.description = predicate, description

    def __contains__(self, value: Any) -> bool:
        try:
            return bool(self.predicate(value))
        except Exception:
            return False

    def __repr__(self) -> str:
        return f"StructuredValues({self.description!r})"


class _Domain:
    """Fast membership test for a finite domain (hashable values use a set)."""

    __slots__ = ("values", "_set")

    def __init__(self, values: Sequence[Any]):
        self.values = values
        try:
            self._set: frozenset[Any] | None = frozenset(values)
        except TypeError:
            self._set = None

    def __contains__(self, value: Any) -> bool:
        if self._set is not None:
            try:
                return value in self._set
            except TypeError:
                return False
        return value in self.values


class CausalModel:
    """A finite structural causal model; see the module docstring."""

    def __init__(
        self,
        variables: list[str],
        values: dict[str, Sequence[Any] | None],
        parents: dict[str, list[str]],
        mechanisms: dict[str, Callable[..., Any]],
        id: str = "causal_model",
    ):
        variables = list(variables)
        seen: set[str] = set()
        for var in variables:
            if not isinstance(var, str) or not var:
                raise ValueError(f"variable names must be non-empty strings (got {var!r})")
            if ARROW in var:
                raise ValueError(f"variable name {var!r} may not contain {ARROW!r}")
            if var in seen:
                raise ValueError(f"variable {var!r} is listed twice in variables")
            seen.add(var)
        for name, mapping in (("values", values), ("parents", parents), ("mechanisms", mechanisms)):
            missing = [v for v in variables if v not in mapping]
            if missing:
                raise ValueError(f"variable(s) {missing} missing from {name}")
            extra = [k for k in mapping if k not in seen]
            if extra:
                raise ValueError(f"{name} has key(s) {extra} that are not in variables")

        self.variables: list[str] = variables
        self.id = id
        self.values: dict[str, Sequence[Any] | None] = {}
        self._domains: dict[str, _Domain | StructuredValues | None] = {}
        for var in variables:
            domain = values[var]
            if domain is None or isinstance(domain, StructuredValues):
                self.values[var] = None
                self._domains[var] = domain
                continue
            if isinstance(domain, (str, bytes)) or not isinstance(domain, (Sequence, range)):
                if isinstance(domain, (set, frozenset)):
                    raise ValueError(
                        f"values[{var!r}] is a set: use a list (sampling must be reproducible, sets are unordered)"
                    )
                raise ValueError(
                    f"values[{var!r}] must be a list, tuple or range of allowed values, or None (got {type(domain).__name__})"
                )
            if len(domain) == 0:
                raise ValueError(f"values[{var!r}] is empty")
            self.values[var] = domain
            self._domains[var] = _Domain(domain)

        self.parents: dict[str, list[str]] = {}
        for var in variables:
            plist = parents[var]
            if isinstance(plist, str) or not isinstance(plist, Iterable):
                raise ValueError(f"parents[{var!r}] must be a list of variable names (got {plist!r})")
            plist = list(plist)
            for parent in plist:
                if parent not in seen:
                    raise ValueError(f"unknown parent {parent!r} of variable {var!r}")
            if len(set(plist)) != len(plist):
                raise ValueError(f"parents[{var!r}] lists a parent twice: {plist}")
            self.parents[var] = plist

        self.children: dict[str, list[str]] = {var: [] for var in variables}
        for var in variables:
            for parent in self.parents[var]:
                self.children[parent].append(var)

        self.mechanisms: dict[str, Callable[..., Any]] = {}
        for var in variables:
            mechanism = mechanisms[var]
            if not callable(mechanism):
                raise ValueError(f"mechanism of variable {var!r} is not callable (got {mechanism!r})")
            _check_arity(var, mechanism, len(self.parents[var]))
            self.mechanisms[var] = mechanism

        self.topological_order: list[str] = self._topological_sort()
        self.inputs: list[str] = [v for v in variables if not self.parents[v]]
        self.outputs: list[str] = [v for v in variables if not self.children[v]]
        self._input_set = frozenset(self.inputs)

    # ------------------------------------------------------------------ structure

    def _topological_sort(self) -> list[str]:
        """Kahn's algorithm; among ready variables the earliest in ``variables`` goes first."""
        position = {v: i for i, v in enumerate(self.variables)}
        indegree = {v: len(self.parents[v]) for v in self.variables}
        ready = [v for v in self.variables if indegree[v] == 0]
        order: list[str] = []
        while ready:
            ready.sort(key=position.__getitem__)
            var = ready.pop(0)
            order.append(var)
            for child in self.children[var]:
                indegree[child] -= 1
                if indegree[child] == 0:
                    ready.append(child)
        if len(order) != len(self.variables):
            remaining = {v for v in self.variables if v not in set(order)}
            cycle = self._find_cycle(remaining)
            raise ValueError(f"the causal graph has a cycle: {' -> '.join(cycle)}")
        return order

    def _find_cycle(self, nodes: set[str]) -> list[str]:
        # Every node left by Kahn's algorithm has a parent in `nodes`; walk parents until a repeat.
        start = min(nodes, key=self.variables.index)
        path: list[str] = [start]
        index = {start: 0}
        node = start
        while True:
            node = next(p for p in self.parents[node] if p in nodes)
            if node in index:
                cycle = path[index[node] :][::-1]  # walked child -> parent; report parent -> child
                return [*cycle, cycle[0]]
            index[node] = len(path)
            path.append(node)

    def depths(self) -> dict[str, int]:
        """Longest distance from an input variable (inputs have depth 0)."""
        depth: dict[str, int] = {}
        for var in self.topological_order:
            depth[var] = 1 + max((depth[p] for p in self.parents[var]), default=-1)
        return depth

    def is_finite(self, var: str) -> bool:
        self._check_known(var)
        return self.values[var] is not None

    def __repr__(self) -> str:
        return (
            f"CausalModel(id={self.id!r}, {len(self.variables)} variables, inputs={self.inputs}, outputs={self.outputs})"
        )

    def _check_known(self, var: str, what: str = "variable") -> None:
        if var not in self.parents:
            raise ValueError(f"unknown {what} {var!r} (causal model {self.id!r} has {self.variables})")

    def _check_value(self, var: str, value: Any, what: str) -> None:
        domain = self._domains[var]
        if domain is not None and value not in domain:
            raise ValueError(
                f"{what} value {value!r} for variable {var!r} is outside its domain "
                f"{domain.description if isinstance(domain, StructuredValues) else _short(self.values[var])}"
            )

    # ------------------------------------------------------------------ running

    def run_forward(self, inputs_or_intervention: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every variable's value; variables given in the dict are clamped to the given values.

        Input variables not given take their mechanism's default. The result is ordered like
        ``variables``.
        """
        given = dict(inputs_or_intervention or {})
        for var, value in given.items():
            self._check_known(var, "intervention/input variable")
            self._check_value(var, value, "intervention/input")
        computed: dict[str, Any] = {}
        for var in self.topological_order:
            if var in given:
                computed[var] = given[var]
                continue
            try:
                value = self.mechanisms[var](*[computed[p] for p in self.parents[var]])
            except Exception as exc:
                raise MechanismError(
                    f"causal model {self.id!r}: the mechanism of {var!r} raised {type(exc).__name__}: {exc}") from exc
            self._check_value(var, value, "mechanism output:")
            computed[var] = value
        return {var: computed[var] for var in self.variables}

    def run_interchange(self, base_input: dict[str, Any], counterfactual_inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Clamp, in the run on ``base_input``, each key's variable to its value on its counterfactual input.

        ``{"v": cf}`` sets base ``v`` to ``run_forward(cf)["v"]``; ``{"a<-b": cf}`` sets base ``a``
        to ``run_forward(cf)["b"]``. Returns the full setting of the intervened base run.
        """
        intervention = self._interchange_values(counterfactual_inputs)
        return self.run_forward({**base_input, **intervention})

    def _interchange_values(self, counterfactual_inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        runs: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}  # id(cf) -> (cf, run); cf kept alive
        intervention: dict[str, Any] = {}
        source_of: dict[str, str] = {}
        for key, cf in counterfactual_inputs.items():
            target, source = parse_target(key)
            self._check_known(target, "interchange variable")
            self._check_known(source, "interchange (counterfactual) variable")
            if target in intervention:
                raise ValueError(f"interchange keys {source_of[target]!r} and {key!r} both set variable {target!r}")
            if not isinstance(cf, dict):
                raise ValueError(f"counterfactual input for {key!r} must be a dict setting (got {type(cf).__name__})")
            cached = runs.get(id(cf))
            if cached is None or cached[0] is not cf:
                cached = (cf, self.run_forward(cf))
                runs[id(cf)] = cached
            intervention[target] = cached[1][source]
            source_of[target] = key
        return intervention

    # ------------------------------------------------------------------ sampling

    def sample_input(
        self,
        filter: Callable[[dict[str, Any]], bool] | None = None,
        rng: random.Random | int | None = None,
    ) -> dict[str, Any]:
        """A random input setting: finite-domain inputs uniformly from their domain, free ones at their default.

        Returns the input variables plus ``raw_input`` (when the model has that variable),
        computed from them. ``filter`` gets that dict; sampling retries until it returns True.
        ``rng``: a ``random.Random``, an int seed (fresh generator), or None (the ``random``
        module's global generator, so ``random.seed`` applies).
        """
        generator = resolve_rng(rng)
        for _ in range(MAX_SAMPLING_TRIES):
            setting: dict[str, Any] = {}
            for var in self.inputs:
                domain = self.values[var]
                setting[var] = self.mechanisms[var]() if domain is None else generator.choice(domain)
            setting = self._with_raw_input(setting)
            if filter is None or filter(setting):
                return setting
        raise RuntimeError(
            f"sample_input: no input of causal model {self.id!r} passed the filter in {MAX_SAMPLING_TRIES} tries; "
            f"the filter is too strict (or never true)"
        )

    def _intervenable(self) -> list[str]:
        return [
            v
            for v in self.variables
            if v not in self._input_set and v not in (RAW_INPUT, RAW_OUTPUT) and self.is_finite(v)
        ]

    def sample_intervention(
        self,
        filter: Callable[[dict[str, Any]], bool] | None = None,
        rng: random.Random | int | None = None,
    ) -> dict[str, Any]:
        """A random non-empty ``{variable: value}`` over finite-domain non-input, non-raw variables.

        Each eligible variable is included with probability 1/2 (resampled until non-empty),
        its value uniform over its domain. Retries until ``filter`` passes.
        """
        generator = resolve_rng(rng)
        eligible = self._intervenable()
        if not eligible:
            raise ValueError(f"causal model {self.id!r} has no finite-domain intermediate variables to intervene on")
        for _ in range(MAX_SAMPLING_TRIES):
            intervention: dict[str, Any] = {}
            while not intervention:
                for var in eligible:
                    if generator.random() < 0.5:
                        intervention[var] = generator.choice(self.values[var])
            if filter is None or filter(intervention):
                return intervention
        raise RuntimeError(
            f"sample_intervention: no intervention on causal model {self.id!r} passed the filter in "
            f"{MAX_SAMPLING_TRIES} tries"
        )

    def _with_raw_input(self, setting: dict[str, Any]) -> dict[str, Any]:
        if RAW_INPUT in self.parents and RAW_INPUT not in self._input_set:
            setting[RAW_INPUT] = self.run_forward(setting)[RAW_INPUT]
        return setting

    def new_raw_input(self, setting: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``setting`` with ``raw_input`` recomputed from its (possibly edited) input variables."""
        result = dict(setting)
        if RAW_INPUT in self.parents and RAW_INPUT not in self._input_set:
            inputs = {k: v for k, v in setting.items() if k in self._input_set}
            result[RAW_INPUT] = self.run_forward(inputs)[RAW_INPUT]
        return result

    # ------------------------------------------------------------------ labels

    def _examples(self, dataset: Any) -> Iterable[dict[str, Any]]:
        iterate = getattr(dataset, "_iter_examples", None)
        return iterate() if iterate is not None else dataset

    def label_counterfactual_data(
        self, dataset: Any, target_variables: list[str], counterfactual_index: int = 0
    ) -> list[Any]:
        """``raw_output`` of each example's base run with ``target_variables`` interchanged.

        ``dataset`` is a `CounterfactualDataset` (or any iterable of ``{"input", "counterfactual_inputs"}``
        dicts); the values come from ``counterfactual_inputs[counterfactual_index]``. Arrow keys
        (``"a<-b"``) are allowed.
        """
        if isinstance(target_variables, str):
            target_variables = [target_variables]
        self._check_has_raw_output()
        for key in target_variables:
            for var in parse_target(key):
                self._check_known(var, "target variable")
        labels = []
        for i, example in enumerate(self._examples(dataset)):
            cfs = example["counterfactual_inputs"]
            if not -len(cfs) <= counterfactual_index < len(cfs):
                raise IndexError(
                    f"example {i} has {len(cfs)} counterfactual input(s); counterfactual_index={counterfactual_index}"
                )
            cf = cfs[counterfactual_index]
            self._check_provides(example["input"], i, "input")
            self._check_provides(cf, i, f"counterfactual input #{counterfactual_index}")
            try:
                labels.append(self.run_interchange(example["input"], {v: cf for v in target_variables})[RAW_OUTPUT])
            except MechanismError as exc:
                raise MechanismError(f"{exc} (example {i}, interchange of {target_variables})") from exc
        return labels

    def _check_provides(self, setting: dict[str, Any], index: int, what: str) -> None:
        """Refuse a dataset setting that lacks an input variable (it would silently take a default)."""
        missing = [v for v in self.inputs if v not in setting]
        if missing:
            raise ValueError(
                f"example {index}'s {what} has no value for input variable(s) {missing} of causal model {self.id!r}: "
                f"the dataset was made for another model (it provides {sorted(k for k in setting if k != RAW_INPUT)})")

    def label_data(self, dataset: Any) -> list[Any]:
        """``raw_output`` of each example's unintervened base run."""
        self._check_has_raw_output()
        labels = []
        for i, example in enumerate(self._examples(dataset)):
            self._check_provides(example["input"], i, "input")
            try:
                labels.append(self.run_forward(example["input"])[RAW_OUTPUT])
            except MechanismError as exc:
                raise MechanismError(f"{exc} (example {i}, base input)") from exc
        return labels

    def _check_has_raw_output(self) -> None:
        if RAW_OUTPUT not in self.parents:
            raise ValueError(f"causal model {self.id!r} has no {RAW_OUTPUT!r} variable to label with")

    def can_distinguish_with_dataset(
        self,
        dataset: Any,
        vars1: list[str],
        vars2: list[str] | None,
        counterfactual_index: int = 0,
    ) -> dict[str, Any]:
        """How many examples get different labels when interchanging ``vars1`` versus ``vars2``.

        ``vars2=None`` compares with the unintervened base output.
        Returns ``{"count": int, "proportion": float, "total": int}``.
        """
        labels1 = self.label_counterfactual_data(dataset, vars1, counterfactual_index)
        if vars2 is None:
            labels2 = self.label_data(dataset)
        else:
            labels2 = self.label_counterfactual_data(dataset, vars2, counterfactual_index)
        total = len(labels1)
        count = sum(1 for a, b in zip(labels1, labels2) if a != b)
        return {"count": count, "proportion": count / total if total else 0.0, "total": total}

    def distinguishability(
        self, dataset: Any, target_variables_list: list[list[str]], counterfactual_index: int = 0
    ) -> str:
        """Text table: the proportion of examples on which each pair of groups gets different labels.

        The last column (``(none)``) compares with no intervention.
        """
        groups = [[g] if isinstance(g, str) else list(g) for g in target_variables_list]
        names = ["+".join(g) for g in groups]
        examples = list(self._examples(dataset))
        labels = [self.label_counterfactual_data(examples, g, counterfactual_index) for g in groups]
        base = self.label_data(examples)
        total = len(base)

        def proportion(a: list[Any], b: list[Any]) -> str:
            if not total:
                return "-"
            return f"{sum(1 for x, y in zip(a, b) if x != y) / total:.2f}"

        header = ["", *names, "(none)"]
        rows = [[name, *[proportion(labels[i], labels[j]) for j in range(len(groups))], proportion(labels[i], base)]
                for i, name in enumerate(names)]
        widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
        lines = [
            f"distinguishability on {total} examples (proportion with different labels; (none) = no intervention)",
            "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        ]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
        return "\n".join(lines)

    # ------------------------------------------------------------------ drawing

    def display_structure(self, path: str | None = None, ax: Any = None) -> Any:
        """Draw the DAG with matplotlib (inputs at the bottom, arrows parent -> child); returns the Figure.

        Saves a PNG to ``path`` when given. Uses no pyplot state, so it is safe with any backend.
        """
        from matplotlib.figure import Figure

        depth = self.depths()
        layers: dict[int, list[str]] = {}
        for var in self.variables:
            layers.setdefault(depth[var], []).append(var)
        x_of: dict[str, float] = {}
        for level in sorted(layers):
            members = layers[level]
            if level > 0:  # barycenter ordering reduces crossings
                index = {v: i for i, v in enumerate(members)}
                members.sort(key=lambda v: (sum(x_of[p] for p in self.parents[v]) / len(self.parents[v]), index[v]))
            width = len(members)
            for i, var in enumerate(members):
                x_of[var] = i - (width - 1) / 2
        max_width = max(len(m) for m in layers.values())
        n_levels = len(layers)

        if ax is None:
            fig = Figure(figsize=(max(4.0, 1.8 * max_width), max(3.0, 1.3 * n_levels)))
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        input_set, output_set = set(self.inputs), set(self.outputs)
        for var in self.variables:
            for child in self.children[var]:
                ax.annotate(
                    "",
                    xy=(x_of[child], depth[child]),
                    xytext=(x_of[var], depth[var]),
                    arrowprops=dict(arrowstyle="->", color="0.4", shrinkA=11, shrinkB=11, lw=1.0),
                    zorder=1,
                )
        for var in self.variables:
            color = "#cfe2ff" if var in input_set else "#d1f2d1" if var in output_set else "#eeeeee"
            ax.text(
                x_of[var],
                depth[var],
                var,
                ha="center",
                va="center",
                fontsize=8,
                bbox=dict(boxstyle="round,pad=0.3", fc=color, ec="0.3"),
                zorder=2,
            )
        ax.set_xlim(-max_width / 2 - 0.2, max_width / 2 + 0.2)
        ax.set_ylim(-0.6, n_levels - 0.4)
        ax.set_axis_off()
        ax.set_title(f"{self.id}", fontsize=10)
        if path is not None:
            fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
        return fig

    def print_structure(self) -> str:
        """A text listing of the graph (variable <- parents, domain size), also printed."""
        lines = [f"causal model {self.id!r}"]
        for var in self.topological_order:
            domain = self.values[var]
            size = "free" if domain is None else f"{len(domain)} values"
            parents = ", ".join(self.parents[var]) or "(input)"
            lines.append(f"  {var} <- {parents}  [{size}]")
        text = "\n".join(lines)
        print(text)
        return text


def _short(domain: Any, limit: int = 8) -> str:
    if isinstance(domain, range):
        return repr(domain)
    items = list(itertools.islice(domain, limit + 1))
    body = ", ".join(repr(v) for v in items[:limit])
    return f"[{body}{', ...' if len(items) > limit else ''}]"
