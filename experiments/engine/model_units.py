"""Model units: where in the network an intervention acts, addressed as (layer, component, [head], positions).

- ``ResidualStream(layer, position)``: the residual stream after block ``layer``
  (``layer=-1``: the embeddings, i.e. the input of block 0); ``component="block_input"`` gives
  the input of block ``layer`` instead.
- ``AttentionOutput`` / ``MLPOutput``: the attention / MLP sublayer output of block ``layer``.
- ``AttentionHead(layer, head, position)``: one query head's value-weighted output, before the
  output projection (under GQA heads index query heads; width = head_dim, read off the weights).

Every unit carries a featurizer (``experiments.featurizers``; identity by default) and optionally the
indices of the features to swap (``feature_indices``; None = all). Units speak the backend-neutral
vocabulary of ``experiments.backends.sites``; no backend appears here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from causal.results import UnitAddress
from experiments.featurizers import Featurizer
from experiments.pipeline import LMPipeline
from experiments.backends.sites import COMPONENTS as _COMPONENT_HEADS
from experiments.backends.sites import Site
from experiments.token_positions import TokenPosition


class UnitError(ValueError):
    """A model unit does not exist in this model (layer or head out of range, unknown component)."""


ATTENTION_PATTERN = "attention_pattern"
"""Pseudo-component of attention-level cells (block / transplant / Q-K scale): the attention of
``layer`` (one ``head``, or all heads when None); the position names the keys to block, the queries
to transplant, or the positions to scale. Not a backend site."""

COMPONENTS = (*_COMPONENT_HEADS, ATTENTION_PATTERN)  # activation components every backend supports, + attention


@dataclass
class ModelUnit:
    """One unit: ``layer`` (-1 only for the residual stream = embeddings), component, optional head, position."""

    layer: int
    component: str
    position: TokenPosition
    head: int | None = None
    featurizer: Featurizer = field(default_factory=Featurizer)
    feature_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise UnitError(f"unknown component {self.component!r}; known: {', '.join(COMPONENTS)}")
        if self.component == ATTENTION_PATTERN:
            pass  # head optional: None = every head of the layer
        elif (self.component == "head_attention_value_output") != (self.head is not None):
            raise UnitError("a head index is required for head units and only for them")
        if not (hasattr(self.featurizer, "featurize") and hasattr(self.featurizer, "inverse")):
            raise UnitError(f"featurizer {self.featurizer!r} lacks featurize(x) -> (f, error) / inverse(f, error)")
        if self.feature_indices is not None:
            self.feature_indices = tuple(int(i) for i in self.feature_indices)

    @property
    def id(self) -> str:
        head = f".h{self.head}" if self.head is not None else ""
        return f"L{self.layer}{head}.{self.component}@{self.position.id}"

    @property
    def address(self) -> UnitAddress:
        featurizer = self.featurizer
        return UnitAddress(
            layer=self.layer, component=self.component, head=self.head, position_id=self.position.id,
            featurizer_id=getattr(featurizer, "id", type(featurizer).__name__),
            featurizer_sha256=featurizer.weights_sha256() if hasattr(featurizer, "weights_sha256") else "",
            feature_indices=list(self.feature_indices) if self.feature_indices is not None else None,
        )

    @property
    def featurized(self) -> bool:
        """True when the patch goes through a featurizer (anything but identity with all features)."""
        return not getattr(self.featurizer, "is_identity", False) or self.feature_indices is not None

    @property
    def site(self) -> Site:
        """The backend-neutral site: layer -1 of the residual stream is the input of block 0."""
        if self.component == ATTENTION_PATTERN:
            raise UnitError("an attention_pattern unit acts inside the attention function, not at a backend site")
        return Site.of_unit(self.layer, self.component)

    def validate(self, pipeline: LMPipeline) -> None:
        """Raise ``UnitError`` if the layer or head does not exist in ``pipeline``'s model."""
        n = pipeline.num_layers
        low = -1 if self.component == "block_output" else 0
        if not low <= self.layer < n:
            raise UnitError(
                f"layer {self.layer} is out of range for {self.component} in a {n}-layer model "
                f"(valid: {low}..{n - 1})"
            )
        if self.head is not None and not 0 <= self.head < pipeline.num_heads:
            raise UnitError(f"head {self.head} is out of range: the model has {pipeline.num_heads} attention heads")


def ResidualStream(layer: int, position: TokenPosition, component: str = "block_output") -> ModelUnit:
    """Residual stream after block ``layer`` (-1 = embeddings), or its input with ``component="block_input"``."""
    if component not in ("block_output", "block_input"):
        raise UnitError(f"a residual-stream unit is block_output or block_input, got {component!r}")
    return ModelUnit(layer, component, position)


def AttentionOutput(layer: int, position: TokenPosition) -> ModelUnit:
    return ModelUnit(layer, "attention_output", position)


def MLPOutput(layer: int, position: TokenPosition) -> ModelUnit:
    return ModelUnit(layer, "mlp_output", position)


def AttentionHead(layer: int, head: int, position: TokenPosition) -> ModelUnit:
    return ModelUnit(layer, "head_attention_value_output", position, head=head)


def AttentionPattern(layer: int, position: TokenPosition, head: int | None = None) -> ModelUnit:
    """The attention probabilities of ``layer`` (one head, or all when None), for attention-level cells."""
    return ModelUnit(layer, ATTENTION_PATTERN, position, head=head)
