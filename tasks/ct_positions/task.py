"""The CT-positions :class:`experiments.task.Task` record (torch-free); its study runs through the study runner:

    python -m experiments.study --task ct_positions [--n-ops 3] [--test] [--model DIR [--codi-base NAME]]

The network side of this task is not a token-position sweep of an ``LMPipeline``: thoughts are fed
embeddings, so interventions run through :mod:`tasks.ct_positions.latent_reasoning` in the task's extra steps
(:mod:`tasks.ct_positions.steps`: whole-position patching of each thought, recorded as raw results that step 3
scores against both CT graphs; blocking each thought with the error taxonomy and problem sensitivity).
``sweeps`` is None and ``token_positions`` returns nothing; step 1 keeps every pair (the organism is not an
``LMPipeline`` that step 1 could filter with). Study folders: ``results/ct_positions/<model>/<n>ops``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from experiments.task import Task
from tasks.ct_positions.causal_models import CT_SLOTS, build_ct_model, step_var
from tasks.ct_positions.checker import ct_checker
from tasks.ct_positions.counterfactuals import CT_FAMILIES, make_ct_datasets
from tasks.ct_positions.steps import EXTRA_STEPS, SECTIONS


class CTSettings(BaseModel):
    """``n_ops``: operations per problem; ``style``: prompt rendering (``compact`` for the organism)."""

    model_config = ConfigDict(extra="forbid")
    n_ops: int = Field(3, ge=2, le=4, description="operations per problem of the patching datasets (2, 3 or 4)")
    style: str = Field("compact", description="prompt rendering: compact (the organism) or words")


def _causal_models(s: CTSettings) -> dict[str, Any]:
    """Default assignment first; competitor ``late``: the last ``n_ops`` slots carry the steps in order
    and the earlier slots idle."""
    late = {CT_SLOTS[len(CT_SLOTS) - s.n_ops + i - 1]: step_var(i) for i in range(1, s.n_ops + 1)}
    return {"default": build_ct_model(s.n_ops), "late": build_ct_model(s.n_ops, late)}


TASK = Task(
    name="ct_positions",
    description="Which continuous thought carries which intermediate result of a multi-step problem",
    settings=CTSettings,
    causal_models=_causal_models,
    families=lambda s: CT_FAMILIES(s.n_ops),
    make_datasets=lambda s, families, size, seed: make_ct_datasets(s.n_ops, size, seed, families),
    token_positions=lambda pipeline, s: [],
    checker=ct_checker,
    default_targets=lambda s, positions_per=None: [[slot] for slot in CT_SLOTS],
    sweeps=None,
    max_new_tokens=lambda s: 4,
    prompt_formats={"compact": "{start}{op_1}{arg_1}...=", "words": "Tom has {start} apples. He ... Answer:"},
    organism=Path(__file__).resolve().parent / "organism" / "ct-llama",
    study_slug=lambda s: f"{s.n_ops}ops" + ("" if s.style == "compact" else f"_{s.style}"),
    filter_pairs=False,
    extra_steps=EXTRA_STEPS,
    report_sections=SECTIONS,
)
