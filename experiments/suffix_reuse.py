"""Suffix reuse: residual-stream patches recompute only what a patch can change (hooks backend fast path).

A patch of the residual stream entering layer r (``block_input`` of layer r, or ``block_output`` of
layer r - 1) at token columns starting at p cannot change anything at positions < p (causal
attention) nor below layer r. So, per part:

1. one base pass keeps the residual entering every layer (B, T, d) and every layer's post-rotary
   keys/values (B, kv_heads, T, d_head);
2. per patched row, layers r .. L-1 run on positions ≥ p only, reading the base keys/values for
   positions < p; rows sharing p are batched across layers (a row joins the batch at its layer r);
3. in the last layer only the read (last) position runs attention and MLP; the other positions ≥ p
   only get their keys/values (the layer is stopped right after its cache update);
4. a patch of the last layer's output needs no compute (only the read position's value can matter);
5. for whole-answer generation the full KV cache of every patched row is assembled (base keys/values
   below layer r and at positions < p, recomputed ones elsewhere) and decoding continues from it.

Decoder layers are the model's own modules, called with a causal mask (left padding honoured),
rotary embeddings for the rows' position ids and a stand-in cache holding the base prefix, so norms,
softcapping, biases and Q/K norms are the architecture's own. Used only where it is exact: see
``SuffixReuse.supports`` (sdpa/eager attention, prompt shorter than any sliding window, layers of a
tested class).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from transformers import DynamicCache

from experiments.architectures import family_of, get_module
from experiments.hooks_backend import register_site_hook
from experiments.pipeline import LMPipeline, PromptBatch
from experiments.sites import Site

#: Layer classes whose forward follows the contract used here (hidden states, 4-D additive mask,
#: ``position_embeddings``, one ``past_key_values.update`` per call); tested per family in
#: tests/test_suffix_reuse.py (Mistral and Qwen 3 layers share the Llama contract).
SUPPORTED_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                              "Olmo2DecoderLayer", "Gemma2DecoderLayer", "GPT2Block"})
RESIDUAL_COMPONENTS = ("block_input", "block_output")


def residual_index(site: Site) -> int:
    """Index into the residual stream: r = input of layer r (``block_output`` of layer l is r = l + 1)."""
    if site.component not in RESIDUAL_COMPONENTS:
        raise ValueError(f"{site} is not a residual-stream site")
    return site.layer + (site.component == "block_output")


class _StopLayer(Exception):
    """Raised by the stand-in cache once a layer's new keys/values are known (the rest is not needed)."""


class _PrefixCache:
    """Stands in for a transformers cache during one decoder-layer call: ``update`` remembers the new
    keys/values (A, kv_heads, q, d_head) and returns them after the base prefix (A, kv_heads, p, d_head)."""

    is_compileable = False

    def __init__(self, prefix_k: torch.Tensor, prefix_v: torch.Tensor, stop: bool = False):
        self.prefix_k, self.prefix_v, self.stop = prefix_k, prefix_v, stop
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.new = (key_states, value_states)
        if self.stop:
            raise _StopLayer
        return torch.cat([self.prefix_k, key_states], dim=2), torch.cat([self.prefix_v, value_states], dim=2)


@dataclass
class BaseRun:
    """The base prompt pass of a part: ``residual[r]`` (B, T, d) enters layer r (r = L: last layer's output,
    before the final norm); ``keys[j]``/``values[j]`` (B, kv_heads, T, d_head) post-rotary, layer j."""

    batch: PromptBatch
    residual: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) at every column, (B, T, ...)


@dataclass
class ResidualPatch:
    """Rows of one intervened prompt pass: row i is base pair ``pairs[i]`` with the residual entering layer
    ``residual[i]`` set to ``values[i]`` (n, d) at padded columns ``columns[i]`` (n,) (repeats allowed)."""

    pairs: torch.Tensor
    residual: torch.Tensor
    columns: torch.Tensor
    values: torch.Tensor

    @staticmethod
    def concat(parts: list["ResidualPatch"]) -> "ResidualPatch":
        width = max(p.columns.shape[1] for p in parts)

        def widen(t: torch.Tensor) -> torch.Tensor:  # repeat the last column: a no-op repeat
            return torch.cat([t, t[:, -1:].expand(-1, width - t.shape[1], *t.shape[2:])], dim=1)

        return ResidualPatch(torch.cat([p.pairs for p in parts]), torch.cat([p.residual for p in parts]),
                             torch.cat([widen(p.columns) for p in parts]), torch.cat([widen(p.values) for p in parts]))


class SuffixReuse:
    """Base pass + suffix-only intervened prompt passes for one pipeline (see the module docstring)."""

    def __init__(self, pipeline: LMPipeline):
        self.pipeline = pipeline
        model = pipeline.model
        self.family = family_of(model)
        self.layers = get_module(model, self.family.layers)
        self.n_layers = len(self.layers)
        base = model.base_model
        self.final_norm = get_module(model, self.family.final_norm)
        self.rotary = getattr(base, "rotary_emb", None)
        self.window = getattr(model.config, "sliding_window", None)

    def supports(self, width: int) -> str | None:
        """None when exact for prompts of ``width`` padded tokens; else the reason it does not apply."""
        model, pipeline = self.pipeline.model, self.pipeline
        if not pipeline.projects_last_only:
            return "the model transforms its final logits"
        names = {type(layer).__name__ for layer in self.layers}
        if not names <= SUPPORTED_LAYERS:
            return f"layer class {sorted(names - SUPPORTED_LAYERS)} not supported"
        if self.family.name == "decoder_layers" and self.rotary is None:
            return "no shared rotary embedding"
        if model.config._attn_implementation not in ("sdpa", "eager"):
            return f"attention implementation {model.config._attn_implementation!r}"
        if self.window is not None and width >= int(self.window):
            return "prompt reaches the sliding window"
        if model.training:
            return "model in training mode"
        return None

    @torch.no_grad()
    def base_pass(self, batch: PromptBatch) -> BaseRun:
        """One forward of the bases keeping every layer's residual input and keys/values."""
        residual: list[torch.Tensor] = []

        def keep(t: torch.Tensor) -> None:
            residual.append(t.detach())

        handles = [register_site_hook(self.layers[0], "input", keep)]
        handles += [register_site_hook(layer, "output", keep) for layer in self.layers]
        try:
            out = self.pipeline.model.base_model(**batch.model_inputs(), use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        cache = out.past_key_values
        keys = [cache.layers[j].keys for j in range(self.n_layers)]
        values = [cache.layers[j].values for j in range(self.n_layers)]
        if len(residual) != self.n_layers + 1 or keys[0].shape[2] != batch.input_ids.shape[1]:
            raise RuntimeError("suffix reuse: the base pass did not expose every layer's residual and keys/values")
        rotary = self.rotary(residual[0], batch.position_ids) if self.family.name == "decoder_layers" else None
        return BaseRun(batch, residual, keys, values, rotary)

    def _mask(self, base: BaseRun, pairs: torch.Tensor, start: int, n_query: int, dtype: torch.dtype) -> torch.Tensor:
        """(A, 1, n_query, start + n_query) additive mask: query column q sees real key columns k ≤ q."""
        cols = torch.arange(start + n_query, device=pairs.device)
        causal = cols[None, :] <= cols[start:, None]  # (q, k)
        allowed = causal[None] & base.batch.attention_mask[pairs, : start + n_query].bool()[:, None, :]
        zero = torch.zeros((), dtype=dtype, device=pairs.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]

    def _layer(self, j: int, x: torch.Tensor, base: BaseRun, pairs: torch.Tensor, start: int,
               prefix: tuple[torch.Tensor, torch.Tensor], stop: bool = False
               ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """Layer j on x (A, q, d) = columns start .. T-1 of rows ``pairs``; returns (output or None when
        stopped, new keys/values (A, kv_heads, q, d_head))."""
        cache = _PrefixCache(*prefix, stop=stop)
        n_query = x.shape[1]
        mask = self._mask(base, pairs, start, n_query, x.dtype)
        kwargs: dict[str, Any] = {"attention_mask": mask, "past_key_values": cache, "use_cache": True}
        if self.family.name == "decoder_layers":
            position_ids = base.batch.position_ids[pairs, start : start + n_query]
            kwargs["position_ids"] = position_ids
            cos, sin = base.rotary
            kwargs["position_embeddings"] = (cos[pairs, start : start + n_query], sin[pairs, start : start + n_query])
        try:
            out = self.layers[j](x, **kwargs)
        except _StopLayer:
            out = None
        if cache.new is None:
            raise RuntimeError(f"suffix reuse: layer {j} did not update its cache")
        return (out[0] if isinstance(out, tuple) else out), cache.new

    @torch.no_grad()
    def prompt_pass(self, base: BaseRun, patch: ResidualPatch, want_cache: bool) -> SimpleNamespace:
        """The intervened prompt pass of ``patch``'s rows: ``last_logits`` (R, V) float32 at the last column
        and, when ``want_cache``, ``past_key_values`` (a DynamicCache over all layers and T columns)."""
        L, width = self.n_layers, base.batch.input_ids.shape[1]
        read = width - 1
        n_rows = patch.pairs.shape[0]
        device = patch.pairs.device
        starts = patch.columns.min(dim=1).values
        final = torch.empty(n_rows, base.residual[0].shape[-1], dtype=base.residual[0].dtype, device=device)
        recomputed: list[list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]] = [[] for _ in range(L)]

        # last layer's output: only the read column can matter; rows not patched there keep the base logits
        hit = (patch.residual == L)[:, None] & (patch.columns == read)
        untouched = ((patch.residual == L) & ~hit.any(dim=1)).nonzero().flatten()
        rows, slots = hit.nonzero(as_tuple=True)
        final[rows] = patch.values[rows, slots].to(final.dtype)

        for start in sorted(set(starts[patch.residual < L].tolist())):
            members = ((starts == start) & (patch.residual < L)).nonzero().flatten()
            active = members[:0]
            x: torch.Tensor | None = None
            for j in range(int(patch.residual[members].min()), L):
                joining = members[patch.residual[members] == j]
                if len(joining):
                    fresh = base.residual[j][patch.pairs[joining], start:].clone()
                    local = (patch.columns[joining] - start)
                    rows = torch.arange(len(joining), device=device)[:, None].expand_as(local)
                    fresh[rows, local] = patch.values[joining].to(fresh.dtype)
                    x = fresh if x is None else torch.cat([x, fresh])
                    active = torch.cat([active, joining])
                pairs = patch.pairs[active]
                prefix = (base.keys[j][pairs, :, :start], base.values[j][pairs, :, :start])
                if j < L - 1:
                    x, kv = self._layer(j, x, base, pairs, start, prefix)
                    recomputed[j].append((active, start, *kv))
                    continue
                if start < read:  # keys/values of columns start .. read-1, then the read column alone
                    _, (k, v) = self._layer(j, x[:, :-1], base, pairs, start, prefix, stop=True)
                    prefix = (torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2))
                out, (k_read, v_read) = self._layer(j, x[:, -1:], base, pairs, read, prefix)
                final[active] = out[:, -1]
                if want_cache:
                    recomputed[j].append((active, start, torch.cat([prefix[0][:, :, start:], k_read], dim=2),
                                          torch.cat([prefix[1][:, :, start:], v_read], dim=2)))

        needed = torch.ones(n_rows, dtype=torch.bool, device=device)
        needed[untouched] = False
        computed = needed.nonzero().flatten()
        first = self.pipeline.project(self.final_norm(final[computed]))
        logits = first.new_empty(n_rows, first.shape[-1])
        logits[computed] = first
        if len(untouched):
            pairs, inverse = patch.pairs[untouched].unique(return_inverse=True)  # each base pair projected once
            logits[untouched] = self.pipeline.project(self.final_norm(base.residual[L][pairs, read]))[inverse]
        cache = self._cache(base, patch, recomputed) if want_cache else None
        return SimpleNamespace(last_logits=logits, past_key_values=cache)

    def _cache(self, base: BaseRun, patch: ResidualPatch,
               recomputed: list[list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]]) -> DynamicCache:
        """Full cache of the patched rows: base keys/values, overwritten where recomputed."""
        cache = DynamicCache(config=self.pipeline.model.config)
        for j in range(self.n_layers):
            keys = base.keys[j][patch.pairs].clone()
            values = base.values[j][patch.pairs].clone()
            for active, start, k, v in recomputed[j]:
                keys[active, :, start:] = k
                values[active, :, start:] = v
            cache.update(keys, values, j)
        return cache
