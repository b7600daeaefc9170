"""Plain torch forward hooks: the backend with no wrapper objects (the default; see ``backend.py``).

Sites are found through ``experiments.backends.architectures`` (the same component map pyvene is given).
Collection runs the base model without its vocabulary projection and stops as soon as the last
needed site has fired; the intervened prompt pass installs one hook per site for that pass only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from experiments.backends.architectures import ArchitectureFamily, family_of, get_module, head_width
from experiments.backends.attention_control import AttentionController, AttentionOp, attention_control
from experiments.backends import PromptPass
from experiments.backends.sites import Site, SiteEdit, SitePatch


class _CollectedEverything(Exception):
    """Raised inside a hook once every requested site has been stored: the rest of the forward is skipped."""


def register_site_hook(
    module: torch.nn.Module, side: str, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """Hook ``fn(tensor) -> tensor | None`` on a module's main input (pre-hook) or output (tuple-aware)."""
    if side == "output":
        def output_hook(_module, _args, output):
            if isinstance(output, tuple):
                new = fn(output[0])
                return None if new is None else (new, *output[1:])
            return fn(output)

        return module.register_forward_hook(output_hook)

    def input_hook(_module, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return module.register_forward_pre_hook(input_hook, with_kwargs=True)


class HooksBackend:
    """``collect``, ``prompt_pass`` and ``edits`` with plain forward hooks on the modules of the component map."""

    name = "hooks"
    operations = frozenset({"suffix_reuse", "gradients", "edits", "attention", "row_patches"})

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.family: ArchitectureFamily = family_of(model)
        self.n_heads = int(model.config.num_attention_heads)
        self.d_head = head_width(model)

    def _module(self, site: Site) -> tuple[torch.nn.Module, str, bool]:
        hook = self.family.components[site.component]
        return get_module(self.model, hook.module.format(layer=site.layer)), hook.side, hook.split_heads

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:-1], self.n_heads, self.d_head)

    @torch.no_grad()
    def collect(self, sites: list[Site], inputs: dict[str, Any]) -> dict[Site, torch.Tensor]:
        """Full activations of ``sites`` on one forward: (B, T, d), or (B, T, H, d_head) for head sites."""
        store: dict[Site, torch.Tensor] = {}
        wanted = set(sites)

        def grabber(site: Site) -> Callable[[torch.Tensor], None]:
            def grab(t: torch.Tensor) -> None:
                store[site] = t.detach().clone()
                if wanted.issubset(store):
                    raise _CollectedEverything
            return grab

        base_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        try:
            with self.edits([SiteEdit(site, grabber(site)) for site in wanted]):
                self.model.base_model(**base_inputs, use_cache=False)
        except _CollectedEverything:
            pass
        missing = wanted - set(store)
        if missing:
            raise RuntimeError(f"sites {sorted(missing, key=str)} never fired during the forward")
        return store

    def _patcher(self, patches: list[SitePatch]) -> Callable[[torch.Tensor], torch.Tensor]:
        def patch(view: torch.Tensor) -> torch.Tensor:
            # in place (inference only): the patched tensor is exactly what the rest of the forward reads
            for p in patches:
                p.apply(view)
            return view
        return patch

    @contextmanager
    def edits(self, edits: Sequence[SiteEdit]) -> Iterator[None]:
        """Every forward inside the block runs each edit's ``fn`` on its site's activation ((B, T, d), or the
        (B, T, H, d_head) view of a head site), in the order given; a returned tensor replaces the activation."""
        handles = []
        try:
            for edit in edits:
                module, side, split = self._module(edit.site)
                handles.append(register_site_hook(module, side, self._editor(edit.fn, split)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _editor(self, fn: Callable[[torch.Tensor], torch.Tensor | None], split: bool
                ) -> Callable[[torch.Tensor], torch.Tensor | None]:
        if not split:
            return fn

        def on_heads(t: torch.Tensor) -> torch.Tensor:
            # the rest of the forward reads the (B, T, H, d_head) view the edit saw (so a gradient kept on it
            # is the gradient of what follows), or the edit's replacement
            view = self._split(t)
            new = fn(view)
            return (view if new is None else new).reshape(t.shape)
        return on_heads

    def attention(self, ops: Sequence[AttentionOp]) -> AbstractContextManager[AttentionController]:
        """Every forward inside the block runs the attention operations ``ops`` (`attention_control`)."""
        return attention_control(self.model, ops)

    def prompt_pass(self, inputs: dict[str, Any], patches: list[SitePatch]) -> PromptPass:
        """The prompt pass with every patch applied at its site, for this pass only: the full model when
        ``inputs`` asks for ``logits_to_keep``, else the base model (the pipeline projects read positions)."""
        by_site: dict[Site, list[SitePatch]] = {}
        for p in patches:
            by_site.setdefault(p.site, []).append(p)
        with self.edits([SiteEdit(site, self._patcher(site_patches)) for site, site_patches in by_site.items()]):
            return PromptPass.of((self.model if "logits_to_keep" in inputs else self.model.base_model)(**inputs))
