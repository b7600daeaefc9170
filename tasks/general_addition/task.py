"""The addition study as a ``Task`` record (see ``experiments/task.py``): its causal models, dataset
families, prompt formats, token positions, checker, default targets, sweeps and shipped organism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from experiments.task import Task
from tasks.general_addition.causal_models import (
    ADDENDS,
    DEFAULT_TEMPLATE,
    PROMPT_TEMPLATES,
    build_addition_model,
    build_tens_without_carry_model,
    carry_var,
    digit_var,
    digit_vars,
    output_digit_var,
)
from tasks.general_addition.checker import addition_checker
from tasks.general_addition.counterfactuals import ADDITION_FAMILIES, make_addition_datasets

ORGANISM = Path(__file__).resolve().parent / "organism" / "addition-llama"


class AdditionSettings(BaseModel):
    """``digits`` per addend (2–4) and the prompt ``template`` (a key of PROMPT_TEMPLATES)."""

    model_config = ConfigDict(extra="forbid")

    digits: int = Field(2, ge=2, le=4, description="digits per addend (2, 3 or 4)")
    template: str = Field(DEFAULT_TEMPLATE, description="prompt format")


def causal_models(s: AdditionSettings) -> dict[str, Any]:
    """The carry graph (main hypothesis) and the competing tens-digit-without-carry graph."""
    return {"carry": build_addition_model(s.digits), "tens_no_carry": build_tens_without_carry_model(s.digits)}


def datasets(s: AdditionSettings, families: list[str] | None, size: int, seed: int) -> dict[str, Any]:
    return make_addition_datasets(s.digits, size, seed, families, template=s.template)


def token_positions(pipeline: Any, s: AdditionSettings) -> list[Any]:
    from tasks.general_addition.token_positions import addition_token_positions

    return addition_token_positions(pipeline, s.digits, s.template)


def addend_group(addend: int, n_digits: int) -> list[str]:
    """All digits of one addend, most significant first: the variables an ``addend_{k}`` token holds."""
    return [digit_var(addend, place) for place in reversed(range(n_digits))]


def default_targets(s: AdditionSettings, position_ids: list[str] | None = None) -> list[list[str]]:
    """Digits (one group per digit, or per addend where the tokens are ``addend_k``), carries, output digits, answer.

    With a tokenizer that puts several digits in one token the positions are ``addend_0``/``addend_1``;
    a single digit cannot own such a token, so the digits are scored jointly per addend.
    """
    joint = any(p.startswith("addend_") for p in position_ids or [])
    digits = [addend_group(a, s.digits) for a in ADDENDS] if joint else [[v] for v in digit_vars(s.digits)]
    return [*digits, *([carry_var(p)] for p in range(s.digits)),
            *([output_digit_var(p)] for p in range(s.digits + 1)), ["raw_output"]]


def own_position(group: list[str], n_digits: int) -> str | None:
    """The token position that holds an input group: a digit's own position, or ``addend_k`` for a whole addend."""
    if len(group) == 1 and group[0] in digit_vars(n_digits):
        return group[0]
    for addend in ADDENDS:
        if group == addend_group(addend, n_digits):
            return f"addend_{addend}"
    return None


def own_position_lines(scores: Any, s: AdditionSettings, targets: list[list[str]]) -> list[str]:
    """Summary table: informative IIA of each input group at its own token position, by layer."""
    pooled = scores.pooled()
    layers = sorted(pooled["layer"].unique())
    fmt = lambda v: "n/a" if v != v else f"{v:.3f}"  # noqa: E731 (NaN-safe)
    lines = ["| variable | " + " | ".join("emb" if layer == -1 else f"L{layer}" for layer in layers) + " |",
             "|---" * (len(layers) + 1) + "|"]
    for group in targets:
        position = own_position(group, s.digits)
        name = "+".join(group)
        own = pooled[(pooled["target_variables"] == name) & (pooled["position_id"] == position)]
        if position is None or own.empty:
            continue
        value = dict(zip(own["layer"], own["informative_accuracy"]))
        lines.append(f"| {name} | " + " | ".join(fmt(float(value.get(layer, float("nan")))) for layer in layers) + " |")
    if len(lines) <= 2:
        return []
    return ["", "Informative IIA of each input variable at its own token position, by layer:", "", *lines]


def variable_descriptions(s: AdditionSettings) -> dict[str, str]:
    """What each variable is, for every input (e.g. the top output digit is 0 on sums below 10**D)."""
    place = lambda p: ["ones", "tens", "hundreds", "thousands", "ten-thousands"][p]  # noqa: E731
    out: dict[str, str] = {}
    for addend in ADDENDS:
        for p in range(s.digits):
            out[digit_var(addend, p)] = f"{place(p)} digit of addend {addend}"
    for p in range(s.digits):
        out[carry_var(p)] = f"carry out of the {place(p)} column, 0 or 1"
    for p in range(s.digits):
        out[output_digit_var(p)] = f"{place(p)} digit of the sum"
    out[output_digit_var(s.digits)] = (f"{place(s.digits)} digit of the sum: the carry out of the top column, 0 for sums "
                                       f"below {10 ** s.digits}")
    out["raw_output"] = "the whole sum"
    return out


def sweeps(pipeline: Any, s: AdditionSettings, positions: list[Any], config: dict[str, Any],
           layers: list[int] | None = None, heads: bool = True) -> list[Any]:
    """Residual stream at every layer (incl. embeddings) × position; every single head at the last position."""
    from experiments.engine.intervention_experiment import PatchAttentionHeads, PatchResidualStream

    layers = list(range(-1, pipeline.num_layers)) if layers is None else layers
    out = [PatchResidualStream(pipeline, layers, positions, config={**config, "id": "residual_stream"})]
    head_layers = [layer for layer in layers if layer >= 0]
    if heads and head_layers:
        out.append(PatchAttentionHeads(pipeline, PatchAttentionHeads.every_head(pipeline, head_layers),
                                       [p for p in positions if p.id == "last"], config={**config, "id": "attention_heads"}))
    return out


TASK = Task(
    name="general_addition",
    description="D-digit addition: which positions and layers carry each digit, carry and output digit",
    settings=AdditionSettings,
    causal_models=causal_models,
    families=lambda s: ADDITION_FAMILIES(s.digits),
    make_datasets=datasets,
    token_positions=token_positions,
    checker=addition_checker,
    default_targets=default_targets,
    sweeps=sweeps,
    max_new_tokens=lambda s: s.digits + 2,
    prompt_formats=dict(PROMPT_TEMPLATES),
    organism=ORGANISM,
    results_name="addition",
    study_slug=lambda s: f"{s.digits}d" + ("" if s.template == DEFAULT_TEMPLATE else f"_{s.template}"),
    summary_extras=own_position_lines,
    variable_descriptions=variable_descriptions,
)
