"""Backend-neutral vocabulary of where an intervention acts, and what it does there.

A ``Site`` is a component at a layer (``block_input``/``block_output``/``attention_output``/
``mlp_output``: activations of shape (B, T, d); ``head_attention_value_output``: (B, T, H, d_head),
one query head's value-weighted output before the output projection; ``mlp_neurons``: (B, T, d_mlp), the
MLP's hidden activation, the input of its output projection). A ``SitePatch`` says which
batch rows and padded token columns of a site get which values. A ``SiteEdit`` is a function run on a
site's activation in every forward while it is active (a backend's ``edits`` operation: reading
activations with gradients, ablations on every decoding step, edits that depend on the run). Backends
take these and nothing else; ``experiments/engine/model_units.py``, the engine and the toolkit speak only this
vocabulary, never module paths or hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: The components every backend supports; True = addressed per head.
COMPONENTS: dict[str, bool] = {
    "block_input": False,
    "block_output": False,
    "attention_output": False,
    "mlp_output": False,
    "head_attention_value_output": True,
    "mlp_neurons": False,
}


@dataclass(frozen=True)
class Site:
    """One representation: ``component`` at ``layer`` (0-based block index; no -1 here: the
    embeddings are ``Site(0, "block_input")``)."""

    layer: int
    component: str

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown component {self.component!r}; known: {', '.join(COMPONENTS)}")

    @property
    def per_head(self) -> bool:
        """True for head components: activations are (B, T, H, d_head) and a patch names one head per row."""
        return COMPONENTS[self.component]

    @classmethod
    def of_unit(cls, layer: int, component: str) -> "Site":
        """The site of a unit at ``layer`` in the project's layer numbering: ``-1`` is the embeddings (the
        residual stream only), the input of block 0."""
        if layer == -1:
            if component != "block_output":
                raise ValueError(f"layer -1 (the embeddings) has no {component}")
            return cls(0, "block_input")
        return cls(layer, component)


@dataclass(frozen=True)
class SiteEdit:
    """Run ``fn(activation)`` at ``site`` in every forward while the edit is active: the activation is
    (B, T, d), or (B, T, H, d_head) for head sites; ``fn`` returns the new activation (same shape) or None
    to leave it as it is (a read)."""

    site: Site
    fn: "Callable[[torch.Tensor], torch.Tensor | None]"


@dataclass
class SitePatch:
    """Set ``values`` at ``site`` for rows × columns of one batch (the intervened prompt pass).

    - ``columns``: (R, n) long, padded-batch token columns of each patched row; a column may repeat
      within a row only with the same value.
    - ``rows``: (R,) long, the batch rows patched (None: rows 0 .. R-1, every row of the batch). Patches
      at different sites on disjoint rows let cells of different sites share one forward (a backend
      declaring ``"row_patches"``).
    - ``values``: (R, n, d) — the new activation at those columns (d = d_head for head sites).
    - ``heads``: (R,) long, the query head of each row (head sites only).
    - ``featurizer`` / ``feature_mask``: when set, the patch is an interchange *through* the
      featurizer: ``inverse(where(mask, f(values), f(base)), error(base))`` — only the masked
      features move; with the identity featurizer and an all-true mask this equals setting ``values``.
      A featurizer whose ``input_width`` is n·d acts on each row's n vectors concatenated (a joint unit
      over the n columns; every row then has exactly n distinct columns).
    """

    site: Site
    columns: "torch.Tensor"
    values: "torch.Tensor"
    heads: "torch.Tensor | None" = None
    featurizer: Any = None
    feature_mask: "torch.Tensor | None" = None
    extra: dict[str, Any] = field(default_factory=dict)
    rows: "torch.Tensor | None" = None

    def apply(self, view: "torch.Tensor") -> None:
        """Write the patch into ``view`` in place: the site's activation (B, T, d), or (B, T, H, d_head) for head
        sites, of the batch the patch names rows and columns of."""
        import torch

        rows = (torch.arange(self.columns.shape[0], device=view.device) if self.rows is None else self.rows)[:, None]
        index = ((rows, self.columns, self.heads[:, None].expand_as(self.columns)) if self.site.per_head
                 else (rows, self.columns))
        view[index] = self.values.to(view.dtype) if self.featurizer is None else self.new_values(view[index])

    def new_values(self, base_values: "torch.Tensor") -> "torch.Tensor":
        """The values to write, given the base run's values (R, n, d) at the same columns."""
        if self.featurizer is None:
            return self.values.to(base_values.dtype)
        return self.swap(base_values, self.values)

    def swap(self, base: "torch.Tensor", source: "torch.Tensor") -> "torch.Tensor":
        """The featurized interchange of (R, n, d) base and source values (jointly over the n columns when
        the featurizer is n·d wide)."""
        return unit_swap(self.featurizer, self.feature_mask, base, source)


def unit_swap(featurizer: Any, feature_mask: "torch.Tensor | None", base: "torch.Tensor",
              source: "torch.Tensor") -> "torch.Tensor":
    """`featurized_swap` of (R, n, d) values at one unit: per vector when the featurizer takes d-wide vectors
    (or any width), on each row's concatenated n·d vector when it takes n·d; any other width is refused."""
    width = getattr(featurizer, "input_width", None)
    d = base.shape[-1]
    if width is None or width == d:
        return featurized_swap(featurizer, feature_mask, base, source)
    rows, n = base.shape[0], base.numel() // (base.shape[0] * d)
    if width != n * d:
        raise ValueError(f"featurizer {getattr(featurizer, 'id', featurizer)!r} maps {width}-wide vectors, but the "
                         f"unit has {n} token(s) of width {d} (a joint featurizer needs exactly {width // d} tokens)")
    joint = featurized_swap(featurizer, feature_mask, base.reshape(rows, n * d), source.reshape(rows, n * d))
    return joint.reshape(base.shape)


def featurized_swap(featurizer: Any, feature_mask: "torch.Tensor | None", base: "torch.Tensor",
                    source: "torch.Tensor") -> "torch.Tensor":
    """``inverse(where(mask, f(source), f(base)), error(base))``: only the masked features move
    (all of them when ``feature_mask`` is None). Shapes: (..., d) in and out."""
    import torch

    features_base, error_base = featurizer.featurize(base)
    features_source, _ = featurizer.featurize(source.to(base.dtype))
    if feature_mask is None:
        mixed = features_source
    else:
        mixed = torch.where(feature_mask.to(features_base.device), features_source, features_base)
    return featurizer.inverse(mixed, error_base).to(base.dtype)
