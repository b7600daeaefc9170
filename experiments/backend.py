"""The backend protocol: what the intervention engine needs from a way of reaching into a model.

- ``collect(sites, inputs) -> {site: activations}``: one forward; (B, T, d), or (B, T, H, d_head)
  for head sites (columns are padded-batch columns).
- ``prompt_pass(inputs, patches) -> model output``: the prompt forward with every
  ``experiments.sites.SitePatch`` applied (the KV cache, for greedy decoding to continue from, and
  either ``last_hidden_state`` of the base model or, when ``inputs`` has ``logits_to_keep``, the
  full model's ``logits``; see ``LMPipeline.greedy_decode``).

Two implementations, tested against the same independent hook reference and against each other:
``"hooks"`` (plain torch forward hooks, no wrapper objects; the default: faster at identical
outputs, see ``benchmarks/backends.py``) and ``"pyvene"`` (``pyvene.IntervenableModel``).
Attention-level interventions do not go through a backend: they act inside transformers'
attention function (``experiments/attention_control.py``) under either backend.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch

from experiments.sites import Site, SitePatch

BackendName = Literal["hooks", "pyvene"]
BACKENDS: tuple[str, ...] = ("hooks", "pyvene")
DEFAULT_BACKEND: BackendName = "hooks"


#: Operations a backend may declare beyond ``collect`` and ``prompt_pass``: ``"suffix_reuse"`` — residual-stream
#: patches may be run by recomputing only what they can change (`experiments.suffix_reuse`), because the
#: backend's prompt pass is the model's own forward with plain patches (no wrapper that the fast path would skip).
#: ``"gradients"`` — the prompt pass is differentiable in the patch values (training a featurizer through it).
OPTIONAL_OPERATIONS = ("suffix_reuse", "gradients")


class Backend(Protocol):
    name: str
    operations: frozenset[str]  # which of OPTIONAL_OPERATIONS it supports; the engine asks this, never the name

    def collect(self, sites: list[Site], inputs: dict[str, Any]) -> dict[Site, torch.Tensor]: ...

    def prompt_pass(self, inputs: dict[str, Any], patches: list[SitePatch]) -> Any: ...


def make_backend(name: str, model: torch.nn.Module) -> Backend:
    """The backend called ``name`` ("hooks" or "pyvene") on ``model``."""
    if name == "hooks":
        from experiments.hooks_backend import HooksBackend

        return HooksBackend(model)
    if name == "pyvene":
        from experiments.pyvene_backend import PyveneBackend

        return PyveneBackend(model)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
