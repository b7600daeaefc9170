"""The decimal comparison ``Task`` record (see ``experiments/task.py``).

Families: ``fix`` (base in ``settings.format``, counterfactual = the same numbers in
``settings.source_format``), ``break`` (the reverse), and the single-format families of
``counterfactuals.py`` (``random``, ``disagreement``, ``change_frac``, ``change_int``) in
``settings.format``. Sweeps: attention / MLP / block output at the role-matched positions.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from experiments.task import Task, register_task
from tasks.decimal_comparison.causal_models import (
    build_numeric_model,
    build_whole_number_fraction_model,
    make_setting,
)
from tasks.decimal_comparison.checker import decimal_checker
from tasks.decimal_comparison.counterfactuals import DECIMAL_FAMILIES, make_decimal_datasets
from tasks.decimal_comparison.formats import FORMATS
from tasks.decimal_comparison.organism import ORGANISM_DIR

CROSS_FORMAT_FAMILIES = ["fix", "break"]


class DecimalSettings(BaseModel):
    """``format``: the (buggy) format studied; ``source_format``: the format patched from."""

    model_config = ConfigDict(extra="forbid")

    format: str = "qa"
    source_format: str = "simple"
    split: str = "heldout"


def _causal_models(s: DecimalSettings) -> dict[str, Any]:
    return {"numeric": build_numeric_model(), "whole_number_fraction": build_whole_number_fraction_model()}


def _make_datasets(s: DecimalSettings, families: list[str] | None, size: int, seed: int,
                   tokenizer: Any | None = None) -> dict[str, Any]:
    from causal.counterfactual_dataset import CounterfactualDataset
    from tasks.decimal_comparison.pairs import sample_pairs

    names = list(families or CROSS_FORMAT_FAMILIES)
    out: dict[str, Any] = {}
    single = [f for f in names if f in DECIMAL_FAMILIES]
    if single:
        out.update(make_decimal_datasets(size, seed, single, s.format))
    pairs = sample_pairs(size, seed=seed, split=s.split) if set(names) & set(CROSS_FORMAT_FAMILIES) else []
    for family in names:
        if family in CROSS_FORMAT_FAMILIES:
            base, source = (s.format, s.source_format) if family == "fix" else (s.source_format, s.format)
            out[family] = CounterfactualDataset.from_examples(
                [{"input": make_setting(p.x, p.y, base, tokenizer),
                  "counterfactual_inputs": [make_setting(p.x, p.y, source, tokenizer)]} for p in pairs], id=family)
        elif family not in DECIMAL_FAMILIES:
            raise ValueError(f"unknown family {family!r}; known: {CROSS_FORMAT_FAMILIES + DECIMAL_FAMILIES}")
    return out


def _token_positions(pipeline: Any, s: DecimalSettings) -> list[Any]:
    from tasks.decimal_comparison.token_positions import role_positions

    return role_positions(pipeline)


def _sweeps(pipeline: Any, s: DecimalSettings, positions: list[Any], config: dict[str, Any],
            layers: list[int] | None = None, heads: bool = True) -> list[Any]:
    """Layer × component patching (attention output, MLP output, block output) at every role-matched position."""
    from experiments.intervention_experiment import PatchUnits

    layers = [layer for layer in (range(pipeline.num_layers) if layers is None else layers) if layer >= 0]
    return [PatchUnits(pipeline, layers, positions, component, config={**config, "id": component})
            for component in ("attention_output", "mlp_output", "block_output")]


TASK = register_task(Task(
    name="decimal_comparison",
    description="Which is bigger: 9.8 or 9.11? Format-dependent fraction-as-integer bug.",
    settings=DecimalSettings,
    causal_models=_causal_models,
    families=lambda s: list(CROSS_FORMAT_FAMILIES),  # same numbers in two formats: role positions align
    make_datasets=_make_datasets,
    token_positions=_token_positions,
    checker=decimal_checker,
    default_targets=lambda s, positions_per=None: [["frac_cmp"], ["raw_output"]],
    sweeps=_sweeps,
    max_new_tokens=lambda s: 7,
    prompt_formats={name: fmt.template for name, fmt in FORMATS.items()},
    organism=ORGANISM_DIR,
))
