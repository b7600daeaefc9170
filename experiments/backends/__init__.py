"""The backend protocol: what the intervention engine needs from a way of reaching into a model.

- ``collect(sites, inputs) -> {site: activations}``: one forward; (B, T, d), or (B, T, H, d_head)
  for head sites (columns are padded-batch columns).
- ``prompt_pass(inputs, patches) -> PromptPass``: the prompt forward with every
  ``experiments.backends.sites.SitePatch`` applied: the KV cache, for greedy decoding to continue from, and the
  last column's state (the base model's final hidden state or, when ``inputs`` has ``logits_to_keep``,
  the full model's logits; see ``LMPipeline.greedy_decode``).

Two implementations, tested against the same independent hook reference and against each other:
``"hooks"`` (plain torch forward hooks, no wrapper objects; the default: faster at identical
outputs, see ``benchmarks/backends.py``) and ``"pyvene"`` (``pyvene.IntervenableModel``).
Attention-level interventions (record, transplant, block, scale) are the ``attention`` operation: both
backends run them inside transformers' attention function (``experiments/backends/attention_control.py``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

import torch
from transformers.utils import ModelOutput

from experiments.backends.attention_control import AttentionController, AttentionOp
from experiments.backends.sites import Site, SiteEdit, SitePatch
from experiments.backends.transformers_adapter import output_cache

BackendName = Literal["hooks", "pyvene"]
BACKENDS: tuple[str, ...] = ("hooks", "pyvene")
DEFAULT_BACKEND: BackendName = "hooks"


#: Operations a backend may declare beyond ``collect`` and ``prompt_pass``: ``"suffix_reuse"`` — residual-stream
#: patches may be run by recomputing only what they can change (`experiments.backends.suffix_reuse`), because the
#: backend's prompt pass is the model's own forward with plain patches (no wrapper that the fast path would skip).
#: ``"gradients"`` — the prompt pass is differentiable in the patch values (training a featurizer through it).
#: ``"edits"`` — ``edits(site_edits)``: a context in which every forward runs each `experiments.backends.sites.SiteEdit`
#: (reads with gradients, ablations on every decoding step, edits that depend on the run).
#: ``"attention"`` — ``attention(ops)``: a context in which every forward runs the attention operations ``ops``
#: (`experiments.backends.attention_control`), yielding their controller (records).
#: ``"row_patches"`` — a `SitePatch` may name the batch rows it writes (``rows``): cells of different sites share
#: one forward.
OPTIONAL_OPERATIONS = ("suffix_reuse", "gradients", "edits", "attention", "row_patches")


@dataclass
class PromptPass:
    """What a prompt pass gives decoding. The last column's state is either ``last_hidden`` (U, d) final-normed
    hidden states with ``rows`` (B,) naming each row's (None: one per row), or ``last_logits`` (B, V);
    ``logits`` (B, K, V) are every kept column's logits when the full model ran (``logits_to_keep``);
    ``cache`` is the KV cache to continue from (None when not asked)."""

    cache: Any = None
    last_hidden: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    last_logits: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.last_hidden is None) == (self.last_logits is None):
            raise ValueError("a prompt pass carries exactly one of last_hidden and last_logits")

    @classmethod
    def of(cls, out: "PromptPass | ModelOutput") -> "PromptPass":
        """A transformers model output as a prompt pass: the full model's ``logits`` (their last column), else the
        base model's ``last_hidden_state`` at the last column; the cache it returned."""
        if isinstance(out, PromptPass):
            return out
        if not isinstance(out, ModelOutput):
            raise TypeError(f"a prompt pass returns a PromptPass or a transformers ModelOutput, not {type(out).__name__}")
        logits = out.get("logits")
        if logits is not None:
            return cls(cache=output_cache(out), last_logits=logits[:, -1], logits=logits)
        return cls(cache=output_cache(out), last_hidden=out["last_hidden_state"][:, -1])


class Backend(Protocol):
    name: str
    operations: frozenset[str]  # which of OPTIONAL_OPERATIONS it supports; the engine asks this, never the name

    def collect(self, sites: list[Site], inputs: dict[str, Any]) -> dict[Site, torch.Tensor]: ...

    def prompt_pass(self, inputs: dict[str, Any], patches: list[SitePatch]) -> PromptPass: ...

    # only where ``"edits"`` is in ``operations``:
    def edits(self, edits: Sequence[SiteEdit]) -> AbstractContextManager[None]: ...

    # only where ``"attention"`` is in ``operations``:
    def attention(self, ops: Sequence[AttentionOp]) -> AbstractContextManager[AttentionController]: ...


def backend_with(operation: str, model: torch.nn.Module) -> Backend:
    """The default backend on ``model``, which must declare ``operation`` (one line naming it otherwise)."""
    backend = make_backend(DEFAULT_BACKEND, model)
    if operation not in backend.operations:
        raise RuntimeError(f"backend {DEFAULT_BACKEND!r} does not support the {operation!r} operation")
    return backend


def make_backend(name: str, model: torch.nn.Module) -> Backend:
    """The backend called ``name`` ("hooks" or "pyvene") on ``model``."""
    if name == "hooks":
        from experiments.backends.hooks_backend import HooksBackend

        return HooksBackend(model)
    if name == "pyvene":
        from experiments.backends.pyvene_backend import PyveneBackend

        return PyveneBackend(model)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
