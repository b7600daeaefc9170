"""The addition study as a ``Task`` record (see ``experiments/task.py``): its causal models, dataset
families, prompt formats, token positions, checker, default targets, sweeps and shipped organism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from experiments.task import Task
from tasks.general_addition.causal_models import (
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

    digits: int = Field(2, ge=2, le=4)
    template: str = DEFAULT_TEMPLATE


def causal_models(s: AdditionSettings) -> dict[str, Any]:
    """The carry graph (main hypothesis) and the competing tens-digit-without-carry graph."""
    return {"carry": build_addition_model(s.digits), "tens_no_carry": build_tens_without_carry_model(s.digits)}


def datasets(s: AdditionSettings, families: list[str] | None, size: int, seed: int) -> dict[str, Any]:
    return make_addition_datasets(s.digits, size, seed, families, template=s.template)


def token_positions(pipeline: Any, s: AdditionSettings) -> list[Any]:
    from tasks.general_addition.token_positions import addition_token_positions

    return addition_token_positions(pipeline, s.digits, s.template)


def default_targets(s: AdditionSettings, position_ids: list[str] | None = None) -> list[list[str]]:
    """One group per digit (or per addend where tokens hold several digits), carry, output digit, answer."""
    joint = any(p.startswith("addend_") for p in position_ids or [])
    digits = ([[digit_var(a, p) for p in reversed(range(s.digits))] for a in (0, 1)] if joint
              else [[v] for v in digit_vars(s.digits)])
    return [*digits, *([carry_var(p)] for p in range(s.digits)),
            *([output_digit_var(p)] for p in range(s.digits + 1)), ["raw_output"]]


def sweeps(pipeline: Any, s: AdditionSettings, positions: list[Any], config: dict[str, Any],
           layers: list[int] | None = None, heads: bool = True) -> list[Any]:
    """Residual stream at every layer (incl. embeddings) × position; every single head at the last position."""
    from experiments.intervention_experiment import PatchAttentionHeads, PatchResidualStream

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
)
