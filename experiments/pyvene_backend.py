"""The only module that touches pyvene: model registration, component widths, intervenable models.

pyvene 0.1.8 on transformers 5 has measured traps; each is handled here:
- model classes it does not list (OLMo 2, Qwen3, Gemma 3 …) are registered by inheritance from a
  listed class, else by layout (``model.layers[i].self_attn.o_proj`` ⇒ the Llama mapping);
- configs without ``head_dim`` (Qwen2, OLMo, OLMo 2) crash its head components: ``head_dim`` is set
  while pyvene builds its wrapper, then removed again (the user's config, and with it the model
  fingerprint of a results folder, must not change because an experiment ran);
- widths are derived from module weights, never from ``hidden_size`` (Gemma 2: heads × head_dim ≠ hidden).
"""

from __future__ import annotations

import contextlib
import io
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints a notice about an optional backend on import
    import pyvene
from pyvene.models import intervenable_modelcard as modelcard
from pyvene.models.llama.modelings_intervenable_llama import (
    llama_lm_type_to_dimension_mapping,
    llama_lm_type_to_module_mapping,
)
from transformers import PreTrainedModel

#: Components the framework exposes, with pyvene's unit kind.
COMPONENT_UNITS: dict[str, str] = {
    "block_input": "pos",
    "block_output": "pos",
    "attention_output": "pos",
    "mlp_output": "pos",
    "head_attention_value_output": "h.pos",
}


class UnsupportedModelError(ValueError):
    """The model's architecture cannot be mapped onto pyvene components."""


def register_model_class(model: PreTrainedModel) -> None:
    """Make pyvene's exact-type registry know ``type(model)`` (no-op if it already does)."""
    cls = type(model)
    mapping = modelcard.type_to_module_mapping
    if cls in mapping:
        return
    for parent in cls.__mro__[1:]:
        if parent in mapping:
            mapping[cls] = mapping[parent]
            modelcard.type_to_dimension_mapping[cls] = modelcard.type_to_dimension_mapping[parent]
            return
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is not None and len(layers) and hasattr(layers[0], "self_attn") and hasattr(layers[0].self_attn, "o_proj"):
        mapping[cls] = llama_lm_type_to_module_mapping
        modelcard.type_to_dimension_mapping[cls] = llama_lm_type_to_dimension_mapping
        return
    raise UnsupportedModelError(
        f"{cls.__name__} is not supported: pyvene has no mapping for it and its layout is not Llama-like "
        f"(model.layers[i].self_attn.o_proj)"
    )


@contextmanager
def pyvene_config_fixes(model: PreTrainedModel) -> Iterator[None]:
    """Give the config a ``head_dim`` while pyvene reads it, then restore the config exactly.

    A lasting change would alter ``config.to_json_string()`` after the first experiment, so a rerun
    in the same process would no longer match its own results folder.
    """
    config = model.config
    if getattr(config, "head_dim", None) is not None or not hasattr(config, "num_attention_heads"):
        yield
        return
    had_attribute = "head_dim" in vars(config)
    old = vars(config).get("head_dim")
    try:
        width = head_width(model)
    except UnsupportedModelError:
        width = config.hidden_size // config.num_attention_heads
    config.head_dim = width
    try:
        yield
    finally:
        if had_attribute:
            config.head_dim = old
        else:
            del config.head_dim


def head_width(model: PreTrainedModel) -> int:
    """Per-head width of the attention value output, read off the o_proj / c_proj weight."""
    heads = model.config.num_attention_heads
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        o_proj = inner.layers[0].self_attn.o_proj
        return o_proj.weight.shape[1] // heads
    transformer = getattr(model, "transformer", None)
    if transformer is not None and hasattr(transformer, "h"):  # GPT-2: Conv1D weight is (in, out)
        return transformer.h[0].attn.c_proj.weight.shape[0] // heads
    raise UnsupportedModelError(f"cannot find the attention output projection of {type(model).__name__}")


@dataclass(frozen=True)
class Site:
    """One pyvene representation: a component at a (pyvene) layer."""

    layer: int
    component: str

    @property
    def unit(self) -> str:
        return COMPONENT_UNITS[self.component]


def build_intervenable(model: PreTrainedModel, sites: list[Site], collect: bool = False) -> pyvene.IntervenableModel:
    """An IntervenableModel with one Vanilla (or Collect) intervention per site, in ``sites`` order.

    Interventions are built with ``keep_last_dim=True`` and no ``embed_dim``: they act on the whole
    width of the gathered tensor (pyvene would otherwise flatten positions and cut the swap at a
    width read from the config: only the first position, or part of a Gemma 2 head, would change).
    """
    register_model_class(model)
    kind = pyvene.CollectIntervention if collect else pyvene.VanillaIntervention
    representations = [
        pyvene.RepresentationConfig(
            layer=site.layer, component=site.component, unit=site.unit, max_number_of_units=1,
            intervention=kind(keep_last_dim=True),
        )
        for site in sites
    ]
    config = pyvene.IntervenableConfig(model_type=type(model), representations=representations)
    with pyvene_config_fixes(model):
        intervenable = pyvene.IntervenableModel(config, model=model, use_fast=False)
    intervenable.disable_model_gradients()
    return intervenable


@torch.no_grad()
def collect_sites(
    collector: pyvene.IntervenableModel, sites: list[Site], inputs: dict[str, torch.Tensor]
) -> dict[Site, torch.Tensor]:
    """Full activations of ``sites`` on one forward: (B, T, d) for "pos", (B, H, T, d_head) for "h.pos".

    ``collector`` is ``build_intervenable(model, sites, collect=True)``; logits are kept at the last
    position only (nothing reads them).
    """
    bsz, width = inputs["input_ids"].shape
    positions = [list(range(width))] * bsz
    heads = [list(range(collector.model.config.num_attention_heads))] * bsz
    locations = [[heads, positions] if site.unit == "h.pos" else positions for site in sites]
    (_, collected), _ = collector(
        {**inputs, "logits_to_keep": 1}, unit_locations={"base": locations}, output_original_output=False
    )
    return dict(zip(sites, collected))
