"""The pyvene backend, and the only module that touches pyvene: registration, intervenable models.

``PyveneBackend`` implements the backend protocol (``experiments/backends/__init__.py``) on
``pyvene.IntervenableModel``: collection through ``CollectIntervention``, patches through
``VanillaIntervention`` with precomputed ``source_representations`` (or a featurized swap, or any
pyvene intervention type the user hands it).

pyvene 0.1.8 on transformers 5 has measured traps; each is handled here:
- its registry is exact-type and misses classes (OLMo 2, Qwen3, Gemma 3 …): every model class is
  registered with our own component map (``experiments/backends/architectures.py``), found by layout, so
  pyvene and the hooks backend hook the very same modules;
- configs without ``head_dim`` (Qwen2, OLMo, OLMo 2) crash its head components: ``head_dim`` is set
  while pyvene builds its wrapper, then removed again (the user's config, and with it the model
  fingerprint of a results folder, must not change because an experiment ran);
- widths are derived from module weights, never from ``hidden_size`` (Gemma 2: heads × head_dim ≠ hidden).
"""

from __future__ import annotations

import contextlib
import io
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator, Sequence

import torch

with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints a notice about an optional backend on import
    import pyvene
from pyvene.models import intervenable_modelcard as modelcard
from pyvene.models.constants import CONST_INPUT_HOOK, CONST_OUTPUT_HOOK, split_head_and_permute
from pyvene.models.llama.modelings_intervenable_llama import (
    llama_lm_type_to_dimension_mapping,
    llama_lm_type_to_module_mapping,
)
from transformers import PreTrainedModel

from experiments.backends.architectures import UnsupportedModelError, family_of, head_width  # noqa: E402
from experiments.backends.attention_control import AttentionController, AttentionOp, attention_control  # noqa: E402
from experiments.backends import PromptPass  # noqa: E402
from experiments.backends.sites import Site, SitePatch  # noqa: E402

#: pyvene's unit kind per head-ness of a component.
_UNIT = {False: "pos", True: "h.pos"}


def pyvene_module_mapping(model: PreTrainedModel) -> dict[str, tuple]:
    """Our component map (``experiments.backends.architectures``) in pyvene's format: path with ``%s``, hook side, head split."""
    family = family_of(model)
    mapping: dict[str, tuple] = {}
    for component, hook in family.components.items():
        side = CONST_INPUT_HOOK if hook.side == "input" else CONST_OUTPUT_HOOK
        entry: tuple = (hook.module.replace("{layer}", "%s"), side)
        if hook.split_heads:
            entry += ((split_head_and_permute, "n_head"),)
        mapping[component] = entry
    return mapping


def register_model_class(model: PreTrainedModel) -> None:
    """Give pyvene's exact-type registry our component map for ``type(model)`` (idempotent).

    pyvene's own entries for other components are kept (users may build their own interventions on
    them); ours replace it for the components we address, so both backends hook the same modules.
    """
    cls = type(model)
    mapping = modelcard.type_to_module_mapping
    dimensions = modelcard.type_to_dimension_mapping
    ours = pyvene_module_mapping(model)  # raises UnsupportedModelError for unknown layouts
    inherited = next((parent for parent in cls.__mro__ if parent in mapping), None)
    base = dict(mapping[inherited]) if inherited is not None else dict(llama_lm_type_to_module_mapping)
    mapping[cls] = {**base, **ours}
    if cls not in dimensions:
        dimensions[cls] = dimensions[inherited] if inherited is not None else llama_lm_type_to_dimension_mapping


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


class FeaturizedInterchange(pyvene.VanillaIntervention):
    """Swap chosen features only: ``inverse(where(mask, f(source), f(base)), error(base))``.

    ``featurizer`` and ``feature_mask`` are set by the backend before each call (one patch per slot).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.patch: SitePatch | None = None

    def forward(self, base, source, subspaces=None, **kwargs):
        source = source if self.source_representation is None else self.source_representation
        assert self.patch is not None, "FeaturizedInterchange called without a patch"
        return self.patch.swap(base, source)

    def __str__(self) -> str:
        return "FeaturizedInterchange()"


def build_intervenable(
    model: PreTrainedModel, sites: list[Site], collect: bool = False, intervention_types: list[type] | None = None
) -> pyvene.IntervenableModel:
    """An IntervenableModel with one Vanilla (or Collect, or ``intervention_types[i]``) intervention per site.

    Interventions are built with ``keep_last_dim=True`` and no ``embed_dim``: they act on the whole
    width of the gathered tensor (pyvene would otherwise flatten positions and cut the swap at a
    width read from the config: only the first position, or part of a Gemma 2 head, would change).
    """
    register_model_class(model)
    default = pyvene.CollectIntervention if collect else pyvene.VanillaIntervention
    kinds = intervention_types or [default] * len(sites)
    representations = [
        pyvene.RepresentationConfig(
            layer=site.layer, component=site.component, unit=_UNIT[site.per_head], max_number_of_units=1,
            intervention=kind(keep_last_dim=True),
        )
        for site, kind in zip(sites, kinds)
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
    """Full activations of ``sites`` on one forward: (B, T, d), or (B, T, H, d_head) for head sites.

    ``collector`` is ``build_intervenable(model, sites, collect=True)``; logits are kept at the last
    position only (nothing reads them).
    """
    bsz, width = inputs["input_ids"].shape
    positions = [list(range(width))] * bsz
    heads = [list(range(collector.model.config.num_attention_heads))] * bsz
    locations = [[heads, positions] if _UNIT[site.per_head] == "h.pos" else positions for site in sites]
    (_, collected), _ = collector(
        {**inputs, "logits_to_keep": 1}, unit_locations={"base": locations}, output_original_output=False
    )
    return {site: (t.transpose(1, 2) if site.per_head else t) for site, t in zip(sites, collected)}


class PyveneBackend:
    """The backend protocol on pyvene. ``intervention_type``: a pyvene intervention class used for plain
    patches instead of ``VanillaIntervention`` (it receives base and source of shape (R, n, d), or
    (R, 1, n, d) for head sites, and returns the new values)."""

    name = "pyvene"
    # pyvene wraps the forward: the suffix fast path would bypass it; attention runs inside the wrapped model
    operations: frozenset[str] = frozenset({"attention"})

    def __init__(self, model: PreTrainedModel, intervention_type: type | None = None):
        self.model = model
        self.intervention_type = intervention_type
        register_model_class(model)
        self._cache: dict[tuple, pyvene.IntervenableModel] = {}

    def _intervenable(self, sites: tuple[Site, ...], kinds: tuple[type, ...] | None, collect: bool):
        key = (sites, kinds, collect)
        if key not in self._cache:
            self._cache[key] = build_intervenable(self.model, list(sites), collect, list(kinds) if kinds else None)
        return self._cache[key]

    @torch.no_grad()
    def collect(self, sites: list[Site], inputs: dict[str, torch.Tensor]) -> dict[Site, torch.Tensor]:
        """Full activations: (B, T, d), or (B, T, H, d_head) for head sites."""
        ordered = tuple(sorted(set(sites), key=lambda s: (s.layer, s.component)))
        return collect_sites(self._intervenable(ordered, None, True), list(ordered), inputs)

    def attention(self, ops: Sequence[AttentionOp]) -> AbstractContextManager[AttentionController]:
        """Every forward inside the block runs the attention operations ``ops`` (`attention_control`)."""
        return attention_control(self.model, ops)

    def prompt_pass(self, inputs: dict[str, Any], patches: list[SitePatch]) -> PromptPass:
        """``model(**inputs)`` through pyvene with every patch applied (one intervention per patch); pyvene
        wraps the full model, so logits are kept at the last position only (``logits_to_keep=1``)."""
        if any(p.rows is not None for p in patches):
            raise ValueError("the pyvene backend patches every row of a batch (it does not declare 'row_patches')")
        inputs = {**inputs, "logits_to_keep": 1}
        plain = self.intervention_type or pyvene.VanillaIntervention
        kinds = tuple(FeaturizedInterchange if p.featurizer is not None else plain for p in patches)
        intervenable = self._intervenable(tuple(p.site for p in patches), kinds, False)
        for p, intervention in zip(patches, intervenable.interventions.values()):
            if isinstance(intervention, FeaturizedInterchange):
                intervention.patch = p
        locations, representations = [], []
        for p in patches:
            columns = p.columns.tolist()
            if p.site.per_head:
                locations.append([[[h] for h in p.heads.tolist()], columns])
                representations.append(p.values[:, None])  # (R, 1, n, d)
            else:
                locations.append(columns)
                representations.append(p.values)
        _, out = intervenable(
            inputs, unit_locations={"sources->base": (locations, locations)}, source_representations=representations
        )
        return PromptPass.of(out)
