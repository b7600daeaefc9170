"""The decimal comparison ``Task`` record (see ``experiments/task.py``); its study runs through the study runner:

    python -m experiments.study --task decimal_comparison [--format qa --source-format simple] [--test] [--model M]

Families: ``fix`` (base in ``settings.format``, counterfactual = the same numbers in
``settings.source_format``), ``break`` (the reverse), and the single-format families of
``counterfactuals.py`` (``random``, ``disagreement``, ``change_frac``, ``change_int``) in
``settings.format``. Every pair is kept (``filter_pairs=False``: the study is about the answers the model gets
wrong). Sweeps: attention / MLP / block output at the role-matched positions (``settings.roles``). Extra steps
(`tasks.decimal_comparison.steps`): bug rate per format, the fix / break metric of the sweeps, generalisation,
attention analysis, transplantation and blocking, ablations; report sections (`tasks.decimal_comparison.report`):
their tables and figures. Study folders: ``results/decimal/<model>/<format>_from_<source format>``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
from tasks.decimal_comparison.report import SECTIONS
from tasks.decimal_comparison.steps import EXTRA_STEPS

CROSS_FORMAT_FAMILIES = ["fix", "break"]


DEFAULT_ROLES = "matched x y qmark last"
SPLITS = ("heldout", "train", "any")


class DecimalSettings(BaseModel):
    """``format``: the (buggy) format studied; ``source_format``: the format patched from; ``split``: which pairs
    (``heldout``: never seen by the organism); ``roles``: the positions of the patching sweeps."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field("qa", description="the format studied (the buggy one): base of the fix pairs")
    source_format: str = Field("simple", description="the format patched from (the correct one)")
    split: str = Field("heldout", description="pairs: heldout (never seen by the organism), train or any")
    roles: str = Field(DEFAULT_ROLES, description="positions of the patching sweeps, space-separated roles")

    @field_validator("split")
    @classmethod
    def _known_split(cls, value: str) -> str:
        if value not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {value!r}")
        return value

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: str) -> str:
        known = ("x", "y", "qmark", "numbers", "question", "prev", "last", "matched")
        roles = value.replace(",", " ").split()
        unknown = [r for r in roles if r not in known]
        if not roles or unknown:
            raise ValueError(f"roles must be some of {', '.join(known)} (space-separated), got {value!r}")
        return " ".join(roles)


def _slug(s: DecimalSettings) -> str:
    """``qa_from_simple`` (plus ``_<split>`` and ``_roles-…`` when not the defaults)."""
    return (f"{s.format}_from_{s.source_format}" + ("" if s.split == "heldout" else f"_{s.split}")
            + ("" if s.roles == DEFAULT_ROLES else "_roles-" + "-".join(s.roles.split())))


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

    return role_positions(pipeline, s.roles.split())


def _sweeps(pipeline: Any, s: DecimalSettings, positions: list[Any], config: dict[str, Any],
            layers: list[int] | None = None, heads: bool = True) -> list[Any]:
    """Layer × component patching (attention output, MLP output, block output) at every role-matched position."""
    from experiments.engine.intervention_experiment import PatchUnits

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
    results_name="decimal",
    study_slug=_slug,
    filter_pairs=False,
    extra_steps=EXTRA_STEPS,
    report_sections=SECTIONS,
))
