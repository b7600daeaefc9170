"""Pydantic configuration of ``python -m experiments.analyze`` (YAML file and command-line flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from experiments.steps.common import DEVICE_PATTERN

ANALYSES = ("attention", "observational", "lens", "probing", "interventions", "patching", "circuits", "gain")
Analysis = Literal["attention", "observational", "lens", "probing", "interventions", "patching", "circuits", "gain"]


class AnalyzeConfig(BaseModel):
    """Everything one analysis run needs; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("organism", description="hub name, local HF folder, or 'organism' (the task's shipped model)")
    task: str = "general_addition"
    out: Path | None = None
    analyses: list[Analysis] = Field(default_factory=list)
    examples: list[str] = Field(default_factory=lambda: ["59+73", "12+34"],
                                description="examples shown one by one (attention maps, lens tables)")
    n_examples: int = Field(256, ge=10, description="sampled prompts for the statistics")
    seed: int = 0
    device: str | None = Field(None, description="cpu, cuda, cuda:N, mps or xpu (None: the pipeline's default)")
    dtype: str | None = None
    batch_size: int = Field(64, ge=1)
    progress: bool = True
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    # attention / EXP0
    sink_tokens: int = Field(0, ge=0, description="first k tokens left out of the attention statistics")
    mass: float = Field(0.9, gt=0, le=1, description="k_eff = keys holding this fraction of the mass")
    alpha: float = Field(0.05, gt=0, lt=1, description="BH false discovery rate for EXP0")
    # probes
    probe_variables: list[str] | None = None
    # interventions
    ablation_kinds: list[Literal["zero", "mean"]] = Field(default_factory=lambda: ["zero", "mean"])
    head_ablation: bool = True
    n_ablation: int = Field(128, ge=1, description="prompts evaluated per ablation")
    # patching
    n_patch_pairs: int = Field(16, ge=1)
    # gain (EXP1-3)
    factors: list[float] = Field(default_factory=lambda: [0.25, 0.354, 0.5, 0.707, 1.0, 1.414, 2.0, 2.828, 4.0])
    gain_target: tuple[int, int] | None = Field(None, description="(layer, head) for EXP1/EXP3; default: the head "
                                                "with most attention to the carry digits (or the last layer's head 0)")
    gain_controls: list[tuple[int, int]] | None = None
    n_gain: int = Field(64, ge=3)
    key_role: str = Field("digits", description="task role whose tokens the key arm of EXP3 scales")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is not None and not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"unknown device {value!r}: use cpu, cuda, cuda:N, mps or xpu")
        return value

    @field_validator("factors")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if len(v) < 3 or any(f <= 0 for f in v):
            raise ValueError("factors needs at least 3 positive values")
        return sorted(v)

    @field_validator("analyses")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))
