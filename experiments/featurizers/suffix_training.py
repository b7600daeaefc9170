"""Training through the suffix: the teacher-forced answer log-probabilities of a residual-stream interchange,
differentiable in the interchanged values, computing only what the values can change.

A patch of the residual stream entering layer r (r = 0: the embeddings' output; r = L: the last layer's output)
at token columns ≥ c of a causal model cannot change anything below layer r, nor any column before c. For a
fixed set of base rows and intervened columns (one DAS cell on one dataset) that part is computed once, under
no_grad, by `TeacherForcedBase` (one plain forward of the teacher-forced base sequences keeping every layer's
residual input and post-rotary keys/values, `experiments.backends.suffix_reuse.SuffixReuse.base_pass`), and every
training step of `SuffixForward` runs:

- only the decoder layers ≥ r, the model's own modules, on the columns c0 .. T-2 of the rows of the step
  (c0: the first intervened column over the dataset, or the first answer-predicting column when that is
  earlier; the last column, the final answer token, predicts nothing and is attended by nothing), each layer
  handed the base run's keys/values of columns < c0 through a cache stand-in
  (`experiments.backends.transformers_adapter.CacheStandIn`, the layer's own ``update`` call) and an explicit
  causal, left-padding-aware 4-D mask, so attention is the model's own implementation (sdpa or eager);
- the final norm and the output head on the answer-predicting columns only.

Gradients reach the values only: the network's parameters are frozen and the cached base tensors are constants.
Where the suffix path is not exact (an attention implementation or layer class outside the tested contract,
prompts reaching a sliding window, a head that transforms its logits: ``SuffixReuse.supports``), `SuffixForward`
says so (``mode == "full"``, ``reason``) and runs the full teacher-forced forward with a patch instead,
explicitly; both modes give the same outputs (tests/test_suffix_training.py).

`SiteForward` is that full forward for any backend site (residual, attention output, MLP output, one head's
output): the prompt pass of a backend declaring ``"gradients"`` (`experiments.backends.backend_with`) with a
`experiments.backends.sites.SitePatch` whose values carry gradients. The first suffix forward of a
layer class in a process checks itself against the plain forward (`transformers_adapter.verify_once`).

Columns are padded columns of the left-padded teacher-forced sequences of
`ResidualAttribution.teacher_forced_inputs` (prompt + answer). Every row has the same number m of intervened
columns (m > 1: a joint unit over several tokens at one layer); values are (B, m, d) or (B, m·d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from experiments.backends.architectures import family_of, get_module
from experiments.backends import backend_with
from experiments.pipeline import LMPipeline, PromptBatch
from experiments.backends.sites import Site, SitePatch
from experiments.backends.suffix_reuse import SuffixReuse, residual_site
from experiments.backends.transformers_adapter import CacheStandIn, verify_once, with_cache


class _KeysKnown(Exception):
    """Raised by a key-only `_Past` once the layer's new keys/values are known (the rest is not needed)."""


class _Past(CacheStandIn):
    """A decoder layer's cache for one suffix call: the base keys/values of the columns before the suffix,
    followed by the suffix's own (differentiable) keys/values. With ``keys_only`` the call stops at the cache
    update, keeping the new keys/values in ``new`` (columns whose only use above is as keys/values)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, keys_only: bool = False):
        self.keys, self.values, self.keys_only = keys, values, keys_only
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys_only:
            self.new = (key_states.to(self.keys.dtype), value_states.to(self.values.dtype))
            raise _KeysKnown
        return (torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=2),
                torch.cat([self.values, value_states.to(self.values.dtype)], dim=2))


@dataclass
class TeacherForcedBase:
    """The teacher-forced base pass shared by every cell of one dataset: ``inputs`` (left-padded prompt + answer
    ids, mask, position ids, (N, T)), each row's answer length, ``residual[r]`` (N, T, d) entering layer r
    (r = L: the last layer's output, before the final norm) and, on the suffix path, every layer's post-rotary
    ``keys``/``values`` (N, kv_heads, T, d_head) and the rotary ``(cos, sin)`` of every column.
    ``unsupported``: None when the suffix path is exact here, else why not (then only ``residual`` is kept)."""

    pipeline: LMPipeline
    inputs: dict[str, torch.Tensor]
    answer_lengths: list[int]
    residual: list[torch.Tensor]
    keys: list[torch.Tensor] | None
    values: list[torch.Tensor] | None
    rotary: tuple[torch.Tensor, torch.Tensor] | None
    unsupported: str | None

    @property
    def width(self) -> int:
        return self.inputs["input_ids"].shape[1]

    @classmethod
    @torch.no_grad()
    def run(cls, pipeline: LMPipeline, inputs: dict[str, torch.Tensor], answer_lengths: Sequence[int],
            force_full: bool = False) -> "TeacherForcedBase":
        """One plain forward of the teacher-forced sequences ``inputs`` (``force_full``: take the full-forward
        path even where the suffix path applies, e.g. to compare the two)."""
        lengths = [int(m) for m in answer_lengths]
        width = inputs["input_ids"].shape[1]
        if len(lengths) != inputs["input_ids"].shape[0] or min(lengths) < 1 or max(lengths) >= width:
            raise ValueError("one answer length (1 .. T-1) per row")
        reason = "full forward requested" if force_full else suffix_unsupported(pipeline, width)
        if reason is None:
            mask = inputs["attention_mask"]
            real = [int(n) for n in mask.sum(-1).tolist()]
            batch = PromptBatch(inputs["input_ids"], mask, inputs["position_ids"], real, [width - n for n in real])
            run = SuffixReuse(pipeline).base_pass(batch)
            return cls(pipeline, inputs, lengths, run.residual, run.keys, run.values, run.rotary, None)
        sites = [residual_site(r) for r in range(pipeline.num_layers + 1)]
        states = backend_with("gradients", pipeline.model).collect(sites, inputs)
        return cls(pipeline, inputs, lengths, [states[site] for site in sites], None, None, None, reason)


def suffix_unsupported(pipeline: LMPipeline, width: int) -> str | None:
    """None when the suffix path is exact for teacher-forced sequences of ``width`` padded columns, else why not
    (the conditions of the suffix-reuse fast path, whose base pass and layer contract it shares)."""
    return SuffixReuse(pipeline).supports(width)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _columns(kwargs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """The layer keywords of suffix columns ``start`` .. ``end`` - 1 (mask rows, positions, rotary)."""
    out = dict(kwargs)
    out["attention_mask"] = kwargs["attention_mask"][:, :, start:end]
    if "position_ids" in kwargs:
        out["position_ids"] = kwargs["position_ids"][:, start:end]
        out["position_embeddings"] = tuple(t[:, start:end] for t in kwargs["position_embeddings"])
    return out


class AnswerForward:
    """The teacher-forced answer slots of a `TeacherForcedBase` and what is read from answer logits (B, M, V):
    summed answer log-probabilities and greedy correctness. Subclasses give ``logits(rows, values)`` for their
    patch, ``base_values(rows)`` (B, m, w) and carry ``columns`` (N, m), ``m``, ``mode``."""

    def _answer_slots(self, base: TeacherForcedBase) -> None:
        self.base, self.pipeline = base, base.pipeline
        self.final_norm = get_module(base.pipeline.model, family_of(base.pipeline.model).final_norm)
        ids = base.inputs["input_ids"]
        device = ids.device
        self.width = ids.shape[1]
        # answer slots: the last M columns before the final one predict each row's (right-aligned) answer tokens
        lengths = torch.tensor(base.answer_lengths, device=device)
        self.n_slots = M = int(lengths.max())
        slot = torch.arange(M, device=device)
        self.targets = ids[:, self.width - M:]  # (N, M): the token each slot predicts
        self.valid = slot[None, :] >= (M - lengths)[:, None]  # (N, M): the slot predicts an answer token

    def _checked_columns(self, columns: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        ids = self.base.inputs["input_ids"]
        n, width = ids.shape
        columns = torch.as_tensor(columns, dtype=torch.long, device=ids.device)
        if columns.ndim != 2 or columns.shape[0] != n or columns.shape[1] < 1:
            raise ValueError(f"columns must be (N={n}, m >= 1), got {tuple(columns.shape)}")
        if int(columns.min()) < 0 or int(columns.max()) >= width - 1:
            raise ValueError("intervened columns must lie before the last answer token of every row")
        if columns.shape[1] > 1 and bool((columns.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("a row's intervened columns must be distinct")
        return columns

    def _rows(self, rows: Any) -> torch.Tensor:
        return torch.as_tensor(rows, dtype=torch.long, device=self.columns.device).reshape(-1)

    def logits(self, rows: Any, values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def unpatched_logits(self, rows: Any = None) -> torch.Tensor:
        """(B, M, V) logits (as `logits`) of the plain (unpatched) base run at the answer-predicting columns."""
        rows = torch.arange(self.columns.shape[0], device=self.columns.device) if rows is None else self._rows(rows)
        M, width = self.n_slots, self.width
        with torch.no_grad():
            if self.pipeline.projects_last_only:
                return _head(self.pipeline, self.final_norm, self.base.residual[-1][rows, width - 1 - M: width - 1])
            sub = {k: v[rows] for k, v in self.base.inputs.items()}
            return _at_least_float32(self.pipeline.model(**sub, use_cache=False).logits[:, width - 1 - M: width - 1])

    def answer_logprob(self, rows: Any, values: torch.Tensor) -> torch.Tensor:
        """(B,) summed log-probabilities of each row's answer tokens (teacher-forced) under the patch; the
        same quantity as `ResidualAttribution.answer_logprob` of the patched full forward."""
        rows = self._rows(rows)
        return self.logprob_of(rows, self.logits(rows, values))

    def logprob_of(self, rows: Any, logits: torch.Tensor) -> torch.Tensor:
        """(B,) summed answer log-probabilities of answer logits (B, M, V) of ``rows``."""
        rows = self._rows(rows)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, self.targets[rows][..., None])[..., 0]
        return torch.where(self.valid[rows], logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(-1)

    def correct_of(self, rows: Any, logits: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the argmax at every answer step is the teacher-forced token (greedy would write the label)."""
        rows = self._rows(rows)
        return ((logits.argmax(-1) == self.targets[rows]) | ~self.valid[rows]).all(-1)

    def correct(self, rows: Any, values: torch.Tensor) -> torch.Tensor:
        """(B,) bool, `correct_of` the patched run."""
        rows = self._rows(rows)
        with torch.no_grad():
            return self.correct_of(rows, self.logits(rows, values))


def _head(pipeline: LMPipeline, final_norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of final states: final norm, the output head on a contiguous copy, then Gemma 2's softcapping where
    set (`LMPipeline.project`), in at least float32 (float64 models keep float64)."""
    model = pipeline.model
    logits = model.get_output_embeddings()(final_norm(hidden).contiguous())
    cap = getattr(pipeline.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return _at_least_float32(logits)


class SiteForward(AnswerForward):
    """Answer log-probabilities of teacher-forced base rows with one backend site (any component: residual,
    attention output, MLP output, one head's output) replaced at their intervened ``columns`` (N, m) by given
    values, differentiable in the values: the full teacher-forced forward through the training backend's
    prompt pass with a `SitePatch` (every layer runs; exact by construction).

    ``base_values``: (N, m, w) the base run's own values at the columns (w = d, or d_head for a head site)."""

    mode = "full"

    def __init__(self, base: TeacherForcedBase, site: Site, columns: torch.Tensor | Sequence[Sequence[int]],
                 base_values: torch.Tensor, head: int | None = None, reason: str | None = None):
        self._answer_slots(base)
        self.columns = self._checked_columns(columns)
        self.m = self.columns.shape[1]
        if site.per_head != (head is not None):
            raise ValueError(f"site {site}: a head index is needed for head sites and only for them")
        if tuple(base_values.shape[:2]) != tuple(self.columns.shape):
            raise ValueError(f"base values {tuple(base_values.shape)} do not match columns {tuple(self.columns.shape)}")
        self.site, self.head, self.reason = site, head, reason
        self.d = int(base_values.shape[-1])
        self._base_values = base_values
        self.backend = backend_with("gradients", self.pipeline.model)

    def base_values(self, rows: Any = None) -> torch.Tensor:
        """(B, m, w) the base run's own values at the rows' intervened columns (all rows when None)."""
        return self._base_values if rows is None else self._base_values[self._rows(rows)]

    def logits(self, rows: Any, values: torch.Tensor) -> torch.Tensor:
        """(B, M, V) answer-slot logits (at least float32) of ``rows`` with the site set to ``values`` (B, m, w) or
        (B, m·w) at their intervened columns."""
        rows = self._rows(rows)
        B = rows.shape[0]
        sub = {k: v.index_select(0, rows) for k, v in self.base.inputs.items()}
        heads = None if self.head is None else torch.full((B,), self.head, dtype=torch.long, device=rows.device)
        patch = SitePatch(self.site, self.columns[rows], values.reshape(B, self.m, self.d), heads)
        out = self.backend.prompt_pass({**sub, "use_cache": False, "logits_to_keep": self.n_slots + 1}, [patch])
        return _at_least_float32(out.logits[:, : self.n_slots])


class SuffixForward(AnswerForward):
    """Answer log-probabilities of base rows with the residual entering layer ``residual`` replaced at their
    intervened ``columns`` (N, m) (padded columns, distinct per row) by given values, differentiable in the
    values; built once per (cell, dataset) from a `TeacherForcedBase` (see the module docstring).

    ``mode``: ``"suffix"`` (layers ≥ r on the suffix columns only) or ``"full"`` (the whole teacher-forced
    forward with a hook patch, where the suffix path is not exact; ``reason`` says why)."""

    def __init__(self, base: TeacherForcedBase, residual: int, columns: torch.Tensor | Sequence[Sequence[int]]):
        self._answer_slots(base)
        model = self.pipeline.model
        self.layers = get_module(model, family_of(model).layers)
        self.n_layers = len(self.layers)
        if not 0 <= residual <= self.n_layers:
            raise ValueError(f"residual index {residual} out of range 0..{self.n_layers}")
        self.r = residual
        self.columns = self._checked_columns(columns)
        self.m = self.columns.shape[1]
        self.d = base.residual[0].shape[-1]
        self.mode, self.reason = ("full", base.unsupported) if base.unsupported else ("suffix", None)
        if self.mode == "suffix":
            self._build_suffix()
        else:
            self._site = SiteForward(base, residual_site(residual), self.columns, self.base_values(),
                                     reason=base.unsupported)

    # ------------------------------------------------------------------ construction
    @torch.no_grad()
    def _build_suffix(self) -> None:
        base, r, L, width = self.base, self.r, self.n_layers, self.width
        c0 = min(int(self.columns.min()), width - 1 - self.n_slots)
        self.first = c0
        self.local = self.columns - c0  # (N, m) columns within the suffix
        cols = slice(c0, width - 1)
        self.x = base.residual[r][:, cols].contiguous()  # (N, S, d): the residual entering layer r
        if r < L:
            # (N, L - r, 2, kv_heads, c0, d_head): base keys/values of the columns before the suffix
            self.past = torch.stack([torch.stack([base.keys[j][:, :, :c0], base.values[j][:, :, :c0]], 1)
                                     for j in range(r, L)], 1).contiguous()
            keep = base.inputs["attention_mask"][:, : width - 1].bool()  # (N, K) real key columns
            key = torch.arange(width - 1, device=keep.device)
            query = torch.arange(c0, width - 1, device=keep.device)
            allowed = (key[None, :] <= query[:, None])[None] & keep[:, None, :]  # (N, S, K)
            zero = torch.zeros((), dtype=self.x.dtype, device=self.x.device)
            self.mask = torch.where(allowed, zero, torch.finfo(self.x.dtype).min)[:, None]  # (N, 1, S, K)
            self.position_ids = base.inputs["position_ids"][:, cols].contiguous()
            self.rotary = None if base.rotary is None else tuple(t[:, cols].contiguous() for t in base.rotary)
        if r < L:  # the layers' calling contract is used: check it once per layer class and process
            verify_once(f"suffix training on {type(self.layers[0]).__name__}", self._self_check)

    def _self_check(self) -> str | None:
        """None when an identity patch of the first rows gives the plain forward's answer logits."""
        rows = torch.arange(min(4, self.columns.shape[0]), device=self.columns.device)
        with torch.no_grad():
            got = self.logits(rows, self.base_values(rows))
            expected = self.unpatched_logits(rows)
        diff = float((got - expected).abs().max())
        scale = max(1.0, float(expected.abs().max()))
        tolerance = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 5e-2
        return None if diff <= tolerance * scale else f"an identity patch moved the answer logits by {diff:.3g}"

    # ------------------------------------------------------------------ outputs
    def base_values(self, rows: Any = None) -> torch.Tensor:
        """(B, m, d) the base run's own residual at the rows' intervened columns (all rows when None)."""
        rows = torch.arange(self.columns.shape[0], device=self.columns.device) if rows is None else self._rows(rows)
        return self.base.residual[self.r][rows[:, None], self.columns[rows]]

    def logits(self, rows: Any, values: torch.Tensor) -> torch.Tensor:
        """(B, M, V) logits (float32; float64 for a float64 model) at the answer-predicting columns of ``rows``
        with the residual entering layer r replaced by ``values`` (B, m, d) or (B, m·d) at their intervened
        columns (slot s of row b predicts ``targets[b, s]``; slots before a shorter answer are ``~valid``)."""
        rows = self._rows(rows)
        values = values.reshape(rows.shape[0], self.m, self.d)
        return self._suffix(rows, values) if self.mode == "suffix" else self._site.logits(rows, values)

    def _suffix(self, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        B = rows.shape[0]
        x = self.x.index_select(0, rows)
        which = torch.arange(B, device=x.device)[:, None].expand(B, self.m)
        x = x.index_put((which, self.local.index_select(0, rows)), values.to(x.dtype))
        if self.r < self.n_layers:
            past = self.past.index_select(0, rows)
            kwargs: dict[str, Any] = {"attention_mask": self.mask.index_select(0, rows), "use_cache": True}
            if self.rotary is not None:
                kwargs["position_ids"] = self.position_ids.index_select(0, rows)
                kwargs["position_embeddings"] = tuple(t.index_select(0, rows) for t in self.rotary)
            for i, j in enumerate(range(self.r, self.n_layers)):
                keys, vals = past[:, i, 0], past[:, i, 1]
                if j == self.n_layers - 1 and x.shape[1] > self.n_slots:
                    # last layer: columns before the answer-predicting ones only give keys/values
                    early = x.shape[1] - self.n_slots
                    keys, vals = self._keys_values(j, x[:, :early], _columns(kwargs, 0, early), keys, vals)
                    x, kwargs = x[:, early:], _columns(kwargs, early, x.shape[1])
                x = self._layer(j, x, kwargs, _Past(keys, vals))
        return _head(self.pipeline, self.final_norm, x[:, x.shape[1] - self.n_slots:])

    def _layer(self, j: int, x: torch.Tensor, kwargs: dict[str, Any], cache: _Past) -> torch.Tensor:
        layer = self.layers[j]
        out = layer(x, **with_cache(layer, kwargs, cache))
        return out[0] if isinstance(out, tuple) else out

    def _keys_values(self, j: int, x: torch.Tensor, kwargs: dict[str, Any], keys: torch.Tensor,
                     values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys``/``values`` followed by layer j's new keys/values of the columns of ``x`` (the layer stops
        at its cache update)."""
        cache = _Past(keys, values, keys_only=True)
        try:
            self._layer(j, x, kwargs, cache)
        except _KeysKnown:
            pass
        if cache.new is None:
            raise RuntimeError(f"suffix training: layer {j} never updated its cache")
        return torch.cat([keys, cache.new[0]], dim=2), torch.cat([values, cache.new[1]], dim=2)
