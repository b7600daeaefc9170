"""Suffix reuse: residual-stream and in-layer patches recompute only what a patch can change (hooks backend fast path).

A patch of the residual stream entering layer r (``block_input`` of layer r, or ``block_output`` of
layer r - 1) at token columns starting at p cannot change anything at positions < p (causal
attention) nor below layer r. So, per part:

1. one base pass keeps the residual entering every layer (B, T, d) and every layer's post-rotary
   keys/values (B, kv_heads, T, d_head); it is also the base rows' own prompt pass;
2. the patched rows' tokens at columns ≥ their start p are packed into one sequence (1, n_tokens, d) and
   each layer runs once on all rows active there (a row joins at its layer r): norms, projections and
   MLPs see exactly the needed tokens; attention is computed per row on a padded layout, reading the
   base keys/values for columns < p (see ``_Packing``);
3. in the last layer only the read (last) column runs attention and MLP; the other columns ≥ p only get
   their keys/values (the layer is stopped right after its cache update);
4. a patch of the last layer's output needs no compute (only the read column's value can matter);
5. for whole-answer generation the full KV cache of every patched row (base keys/values below layer r
   and at columns < p, recomputed ones elsewhere) is handed to decoding.

A patch inside layer j (attention or MLP output, a head, the MLP neurons) at columns c changes nothing
but layer j's output at c: the layer's keys/values come from its input. ``layer_outputs`` runs layer j
on those tokens alone (base keys/values for the rest) with the patch applied, which gives the equal
residual patch of layer j's output (residual index j + 1); the steps above take it from there.

Decoder layers are the model's own modules, called with packed rotary embeddings and a stand-in cache;
their attention dispatches through transformers' attention registry to ``packed_attention``, which
unpacks to padded rows and calls the model's own attention function (sdpa or the modeling file's
eager one) with a causal mask (left padding honoured). Norms, softcapping, biases and Q/K norms are
the architecture's own. Used only where it is exact: see ``SuffixReuse.supports`` (sdpa/eager
attention, prompt shorter than any sliding window, layers of a tested class).
"""

from __future__ import annotations

import contextvars
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from experiments.backends.architectures import family_of, get_module
from experiments.backends import PromptPass, backend_with
from experiments.pipeline import LMPipeline, PromptBatch
from experiments.backends.sites import Site, SiteEdit, SitePatch
from experiments.backends.transformers_adapter import (CacheStandIn, attention_implementation, attention_implementation_set,
                                              cache_layer_states,
                                              output_cache, verify_once, with_cache)

#: Layer classes whose forward follows the contract used here (hidden states, 4-D additive mask,
#: ``position_embeddings``, one cache ``update`` per call); tested per family in
#: tests/test_suffix_reuse.py (Mistral and Qwen 3 layers share the Llama contract).
SUPPORTED_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                              "Olmo2DecoderLayer", "Gemma2DecoderLayer", "GPT2Block"})
RESIDUAL_COMPONENTS = ("block_input", "block_output")
#: Components inside a layer: a patch there at token columns c changes that layer's output at c only (the
#: layer's keys and values are computed from its input), so the suffix resumes at the next residual index.
IN_LAYER_COMPONENTS = ("attention_output", "mlp_output", "head_attention_value_output", "mlp_neurons")


def residual_index(site: Site) -> int:
    """Index into the residual stream: r = input of layer r (``block_output`` of layer l is r = l + 1)."""
    if site.component not in RESIDUAL_COMPONENTS:
        raise ValueError(f"{site} is not a residual-stream site")
    return site.layer + (site.component == "block_output")


def resume_index(site: Site) -> int:
    """The residual index a patch at ``site`` writes into: ``residual_index`` for residual sites, the output of
    the site's layer (``site.layer + 1``) for the components inside a layer."""
    if site.component in IN_LAYER_COMPONENTS:
        return site.layer + 1
    return residual_index(site)


def residual_site(r: int) -> Site:
    """The site of residual index r: the embeddings' output (r = 0) or layer r - 1's output."""
    return Site.of_unit(r - 1, "block_output")


class _StopLayer(Exception):
    """Raised by the stand-in cache once a layer's new keys/values are known (the rest is not needed)."""


class _Packing(CacheStandIn):
    """One packed layer call. Token t of the packed sequence belongs to active row ``slot[t]`` at column
    ``col[t]``. Stands in for the layer's cache (``update`` writes the new keys/values into the rows'
    (R, kv_heads, T, d_head) buffers, which start as the base run's) and lays the packed queries out
    as padded rows for the attention function."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, col: torch.Tensor,
                 attention_mask: torch.Tensor, implementation: str, stop: bool = False):
        self.keys, self.values, self.slot, self.col, self.stop = keys, values, slot, col, stop
        self.implementation = implementation
        self.first, last = int(col.min()), int(col.max())
        self.width = last + 1  # keys a query can see
        cols = torch.arange(self.width, device=col.device)
        causal = cols[None, :] <= cols[self.first :, None]  # (query column, key column)
        allowed = causal[None] & attention_mask[:, : self.width].bool()[:, None, :]
        zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
        self.mask = torch.where(allowed, zero, torch.finfo(keys.dtype).min)[:, None]  # (R, 1, q, K)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[self.slot, :, self.col] = key_states[0].transpose(0, 1).to(self.keys.dtype)
        self.values[self.slot, :, self.col] = value_states[0].transpose(0, 1).to(self.values.dtype)
        if self.stop:
            raise _StopLayer
        return self.keys[:, :, : self.width], self.values[:, :, : self.width]

    def attend(self, inner: Callable[..., Any], module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """query (1, H, n_tokens, d) packed -> output (1, n_tokens, H, d) packed, via ``inner`` on padded rows."""
        rows, heads, d = key.shape[0], query.shape[1], query.shape[-1]
        padded = query.new_zeros(rows, heads, self.width - self.first, d)
        local = self.col - self.first
        padded[self.slot, :, local] = query[0].transpose(0, 1)
        out, _ = inner(module, padded, key, value, self.mask, **kwargs)  # (R, q, H, d)
        return out[self.slot, local][None], None


_PACKING: contextvars.ContextVar[_Packing | None] = contextvars.ContextVar("suffix_reuse_packing", default=None)
_INNER: dict[tuple[str, str], Callable[..., Any]] = {}
#: Name of ``packed_attention`` in transformers' attention registry (selected only inside a packed pass).
PACKED_ATTENTION = "suffix_reuse_packed"


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention-registry function of a packed pass: the model's own attention function (the
    implementation it was configured with) on the current ``_Packing``'s padded rows."""
    packing = _PACKING.get()
    if packing is None:
        raise RuntimeError(f"attention implementation {PACKED_ATTENTION!r} used outside a suffix-reuse pass")
    return packing.attend(_inner_attention(module, packing.implementation), module, query, key, value, **kwargs)


def _inner_attention(module: torch.nn.Module, implementation: str) -> Callable[..., Any]:
    """The function ``module`` would call for ``implementation`` ("eager": its modeling file's own)."""
    found = _INNER.get((type(module).__module__, implementation))
    if found is None:
        if implementation == "eager":
            found = sys.modules[type(module).__module__].eager_attention_forward
        else:
            found = ALL_ATTENTION_FUNCTIONS[implementation]
        _INNER[(type(module).__module__, implementation)] = found
    return found


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


#: Packed tokens per decoder-layer call (CPU, CUDA): whole rows are grouped up to this many tokens.
#: On CPU, calls of several thousand tokens ran slower (allocator behaviour) than medium ones.
PACKED_TOKENS_PER_CALL = (4096, 65536)


def _row_chunks(counts: list[int], budget: int) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first token, end token) of consecutive rows holding ``counts`` tokens each,
    grouped greedily up to ``budget`` tokens (a row larger than the budget is a chunk of its own)."""
    chunks, r0, t0, total = [], 0, 0, 0
    for r, n in enumerate(counts):
        if total and total + n > budget:
            chunks.append((r0, r, t0, t0 + total))
            r0, t0, total = r, t0 + total, 0
        total += n
    if counts:
        chunks.append((r0, len(counts), t0, t0 + total))
    return chunks


@dataclass
class BaseRun:
    """The base prompt pass of a part: ``residual[r]`` (B, T, d) enters layer r (r = L: last layer's output,
    before the final norm); ``keys[j]``/``values[j]`` (B, kv_heads, T, d_head) post-rotary, layer j."""

    batch: PromptBatch
    residual: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) at every column, (B, T, ...)
    output: Any = None  # the base model's own output of this pass (decoding of the base rows continues from it)

    @property
    def width(self) -> int:
        """T, the padded prompt width."""
        return self.batch.input_ids.shape[1]


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
        implementation = attention_implementation(model)
        if implementation not in ("sdpa", "eager"):
            return f"attention implementation {implementation!r}"
        if implementation == "eager" and getattr(model.config, "reorder_and_upcast_attn", False):
            return "GPT-2's reorder_and_upcast_attn bypasses the attention registry"
        if self.window is not None and width >= int(self.window):
            return "prompt reaches the sliding window"
        if model.training:
            return "model in training mode"
        return None

    @torch.no_grad()
    def base_pass(self, batch: PromptBatch) -> BaseRun:
        """One forward of the bases keeping every layer's residual input and keys/values; it is also the
        prompt pass of the unpatched base rows (``BaseRun.output``, the body's output with its cache)."""
        kept: dict[int, torch.Tensor] = {}

        def keep(r: int) -> Callable[[torch.Tensor], None]:
            def fn(t: torch.Tensor) -> None:
                kept[r] = t.detach()
            return fn

        edits = [SiteEdit(residual_site(r), keep(r)) for r in range(self.n_layers + 1)]
        with backend_with("edits", self.pipeline.model).edits(edits):
            out = self.pipeline.model.base_model(**batch.model_inputs(), use_cache=True)
        residual = [kept[r] for r in sorted(kept)]
        cache = output_cache(out)
        keys, values = (list(t) for t in zip(*(cache_layer_states(cache, j) for j in range(self.n_layers))))
        if len(residual) != self.n_layers + 1 or keys[0].shape[2] != batch.input_ids.shape[1]:
            raise RuntimeError("suffix reuse: the base pass did not expose every layer's residual and keys/values")
        rotary = self.rotary(residual[0], batch.position_ids) if self.family.name == "decoder_layers" else None
        return BaseRun(batch, residual, keys, values, rotary, output=out)

    @contextmanager
    def _packed(self) -> Iterator[str]:
        """Route the layers' attention to ``packed_attention``; yields the implementation it replaces."""
        with attention_implementation_set(self.pipeline.model, PACKED_ATTENTION) as previous:
            yield previous

    def _layer(self, j: int, x: torch.Tensor, packing: _Packing, pairs: torch.Tensor,
               base: BaseRun) -> torch.Tensor | None:
        """Layer j on packed tokens x (n, d) of rows ``pairs`` (R,) laid out by ``packing``; returns the
        layer's output (n, d), or None when the packing stops after the cache update."""
        kwargs = with_cache(self.layers[j], {"attention_mask": None, "use_cache": True}, packing)
        if self.family.name == "decoder_layers":
            flat = pairs[packing.slot] * base.width + packing.col  # token -> (pair, column) in (B * T)
            kwargs["position_ids"] = base.batch.position_ids.flatten().index_select(0, flat)[None]
            kwargs["position_embeddings"] = tuple(t.flatten(0, 1).index_select(0, flat)[None] for t in base.rotary)
        token = _PACKING.set(packing)
        try:
            out = self.layers[j](x[None], **kwargs)
        except _StopLayer:
            return None
        finally:
            _PACKING.reset(token)
        return (out[0] if isinstance(out, tuple) else out)[0]

    @torch.no_grad()
    def layer_outputs(self, base: BaseRun, patch: SitePatch, pairs: torch.Tensor) -> torch.Tensor:
        """Layer j = ``patch.site.layer``'s output (R, n, d) at the patch's columns (R, n), row i being base pair
        ``pairs[i]`` with ``patch`` applied inside the layer (an in-layer site): the layer runs on those tokens
        alone, reading the base run's keys/values for every other column. With ``resume_index`` this turns an
        in-layer patch into the equal ``ResidualPatch`` at the layer's output."""
        site = patch.site
        if site.component not in IN_LAYER_COMPONENTS:
            raise ValueError(f"{site} is not inside a layer")
        j, (n_rows, n) = site.layer, patch.columns.shape
        device = patch.columns.device
        slot = torch.arange(n_rows, device=device).repeat_interleave(n)
        col = patch.columns.flatten()
        x = base.residual[j][pairs[slot], col]
        # the packed tokens are row-major (row, k): the patch acts on them as a batch of R rows × n columns
        local = replace(patch, columns=torch.arange(n, device=device).expand(n_rows, n), rows=None)

        def edit(t: torch.Tensor) -> torch.Tensor:
            view = t[0].reshape(n_rows, n, *t.shape[2:])
            local.apply(view)
            return view.reshape(t.shape)

        keys, values = base.keys[j].index_select(0, pairs), base.values[j].index_select(0, pairs)
        mask = base.batch.attention_mask.index_select(0, pairs)
        with self._packed() as implementation, backend_with("edits", self.pipeline.model).edits([SiteEdit(site, edit)]):
            out = self._layer(j, x, _Packing(keys, values, slot, col, mask, implementation), pairs, base)
        return out.reshape(n_rows, n, -1)

    @torch.no_grad()
    def _self_check(self, base: BaseRun) -> str | None:
        """None when re-inserting base row 0's own residual at layer 0 (every layer recomputed from its first
        real column) gives its plain forward's final state; else how far off it is."""
        width, first = base.width, int(base.batch.pad_offsets[0])
        columns = torch.arange(first, width, device=base.residual[0].device)[None]
        values = base.residual[0][0, columns[0]][None]
        zero = torch.zeros(1, dtype=torch.long, device=columns.device)
        out = self._prompt_pass(base, ResidualPatch(zero, zero, columns, values), want_cache=False)
        expected = self.final_norm(base.residual[self.n_layers][0, width - 1])
        diff = float((out.last_hidden[0] - expected).abs().max())
        scale = max(1.0, float(expected.abs().max()))
        tolerance = 1e-3 if expected.dtype in (torch.float32, torch.float64) else 5e-2
        if not diff <= tolerance * scale:
            return f"an identity patch moved the final state by {diff:.3g}"
        return None

    def prompt_pass(self, base: BaseRun, patch: ResidualPatch, want_cache: bool) -> PromptPass:
        """The intervened prompt pass of ``patch``'s rows: ``last_hidden`` (U, d) final-normed states at the
        last column with ``rows`` (R,) naming each row's (rows whose output cannot change share
        their base pair's state), and, when ``want_cache``, ``cache`` (a DynamicCache over all
        layers and T columns); see ``LMPipeline.last_top_k``. The first call in a process checks the packed
        path against the plain forward (``transformers_adapter.verify_once``)."""
        layer = type(self.layers[0]).__name__
        verify_once(f"suffix reuse (hooks backend) on {layer}", lambda: self._self_check(base))
        return self._prompt_pass(base, patch, want_cache)

    @torch.no_grad()
    def _prompt_pass(self, base: BaseRun, patch: ResidualPatch, want_cache: bool) -> PromptPass:
        L, width = self.n_layers, base.width
        read = width - 1
        n_rows = patch.pairs.shape[0]
        device = patch.pairs.device
        starts = patch.columns.min(dim=1).values
        final = torch.empty(n_rows, base.residual[0].shape[-1], dtype=base.residual[0].dtype, device=device)
        buffers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * L  # (rows, keys, values)

        # last layer's output: only the read column can matter; rows not patched there keep the base state
        hit = (patch.residual == L)[:, None] & (patch.columns == read)
        untouched = ((patch.residual == L) & ~hit.any(dim=1)).nonzero().flatten()
        rows, slots = hit.nonzero(as_tuple=True)
        final[rows] = patch.values[rows, slots].to(final.dtype)

        deep = patch.residual < L
        active = deep.nonzero().flatten()[:0]  # rows running so far, in joining order
        x = base.residual[0].new_empty(0, base.residual[0].shape[-1])  # their packed tokens
        slot = col = torch.empty(0, dtype=torch.long, device=device)
        with self._packed() as implementation:
            for j in range(int(patch.residual[deep].min()) if bool(deep.any()) else L, L):
                joining = (deep & (patch.residual == j)).nonzero().flatten()
                if len(joining):
                    span = width - starts[joining]  # columns start .. T-1 of each joining row
                    owner = torch.repeat_interleave(torch.arange(len(joining), device=device), span)
                    first = torch.cumsum(span, 0) - span
                    new_col = starts[joining][owner] + torch.arange(len(owner), device=device) - first[owner]
                    flat = patch.pairs[joining][owner] * width + new_col
                    fresh = base.residual[j].flatten(0, 1).index_select(0, flat)
                    token = first[:, None] + patch.columns[joining] - starts[joining][:, None]  # (J, n) in fresh
                    fresh[token.flatten()] = patch.values[joining].flatten(0, 1).to(fresh.dtype)
                    x = torch.cat([x, fresh])
                    slot = torch.cat([slot, owner + len(active)])
                    col = torch.cat([col, new_col])
                    active = torch.cat([active, joining])
                pairs = patch.pairs[active]
                keys, values = base.keys[j].index_select(0, pairs), base.values[j].index_select(0, pairs)
                mask = base.batch.attention_mask.index_select(0, pairs)
                buffers[j] = (active, keys, values)
                # rows in chunks of about PACKED_TOKENS_PER_CALL tokens (a row's tokens are contiguous, slot order)
                counts = torch.bincount(slot, minlength=len(active)).tolist()
                outputs = []
                for r0, r1, t0, t1 in _row_chunks(counts, PACKED_TOKENS_PER_CALL[device.type == "cuda"]):
                    xs, ss, cs = x[t0:t1], slot[t0:t1] - r0, col[t0:t1]
                    rows_kv = (keys[r0:r1], values[r0:r1])
                    if j < L - 1:
                        packing = _Packing(*rows_kv, ss, cs, mask[r0:r1], implementation)
                        outputs.append(self._layer(j, xs, packing, pairs[r0:r1], base))
                        continue
                    early = cs < read  # keys/values of columns start .. read-1, then the read column alone
                    if bool(early.any()):
                        packing = _Packing(*rows_kv, ss[early], cs[early], mask[r0:r1], implementation, stop=True)
                        self._layer(j, xs[early], packing, pairs[r0:r1], base)
                    at_read = ~early
                    packing = _Packing(*rows_kv, ss[at_read], cs[at_read], mask[r0:r1], implementation)
                    final[active[r0 + ss[at_read]]] = self._layer(j, xs[at_read], packing, pairs[r0:r1], base)
                if j < L - 1:
                    x = outputs[0] if len(outputs) == 1 else torch.cat(outputs)

        computed = torch.ones(n_rows, dtype=torch.bool, device=device)
        computed[untouched] = False
        computed = computed.nonzero().flatten()
        pairs, inverse = patch.pairs[untouched].unique(return_inverse=True)  # each base pair's state once
        hidden = self.final_norm(torch.cat([final[computed], base.residual[L][pairs, read]]))
        rows = torch.empty(n_rows, dtype=torch.long, device=device)
        rows[computed] = torch.arange(len(computed), device=device)
        rows[untouched] = len(computed) + inverse
        cache = self._cache(base, patch, buffers) if want_cache else None
        return PromptPass(cache=cache, last_hidden=hidden, rows=rows)

    def _cache(self, base: BaseRun, patch: ResidualPatch,
               buffers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]) -> DynamicCache:
        """Full cache of the patched rows: the base keys/values, the recomputing rows' buffers where they ran."""
        cache = DynamicCache(config=self.pipeline.model.config)
        for j in range(self.n_layers):
            keys = base.keys[j][patch.pairs]
            values = base.values[j][patch.pairs]
            if buffers[j] is not None:
                active, k, v = buffers[j]
                keys[active], values[active] = k, v
            cache.update(keys, values, j)
        return cache
