"""Attention-level interventions: record and rewrite attention probabilities, queries and keys.

Works through transformers' attention-function registry: :data:`ATTENTION_IMPLEMENTATION` names an
eager attention function (``softmax(Q Kᵀ · scaling + mask [+ softcap]) V``, grouped-query heads read
kv head ``h // groups``) registered with both ``AttentionInterface`` and ``AttentionMaskInterface``
(without the mask registration the causal mask would be silently dropped). Inside
``with attention_control(model, ops) as ctl:`` the model runs on that function and ``ops`` act in
every forward: the prompt pass and every cached decoding step.

Coordinates. Batch rows are the rows of the padded batch. Every op says how its positions count
(``coordinates=``): ``"prompt"`` counts each row's own tokens, the unpadded prompt's token indices
(0 .. n_b - 1), then its generated tokens (n_b, n_b + 1, ...); the controller reads each row's left
padding off the prompt pass's attention mask and converts. ``"cache"`` names *cache coordinates*
directly: the columns of the left-padded prompt (0 .. T-1), then the generated tokens (T, T+1, ...); a
row's token i is column i + its padding (``PromptBatch.cache_columns``). Unstated (None), positions are
cache columns for this release, with a ``FutureWarning`` when the batch is padded (where the two differ);
``"prompt"`` becomes the default in the next. In a forward
whose cache holds ``N`` positions (past + new) and whose queries hold ``Q`` new tokens, query ``i``
sits at coordinate ``N - Q + i``. A forward is a *prompt pass* when it has no cached keys, a
*decoding step* otherwise. ``N`` is counted from the prompt pass on (the context must be entered
before it; entered mid-generation, ``N`` is read off the first layer that provably holds every key).

Sliding-window layers (Gemma 2's ``sliding_attention``; transformers' ``DynamicSlidingWindowLayer``
keeps only the last ``window - 1`` keys) hand the attention ``K <= N`` keys: key ``j`` of such a layer
is coordinate ``N - K + j``. Ops keep acting in cache coordinates there; a coordinate the layer no
longer holds is outside every current query's window (invisible anyway), so an op naming it has
nothing to act on at that layer. A layer holding fewer keys than ``N`` for any other reason (not a
sliding layer, or holding less than its window) makes coordinates ambiguous: ops on it raise.

Masks and precision. A query whose every visible key is blocked attends to nothing (an all-zero
probability row, a zero attention output), never to masked (future, padding, outside-window)
columns. The softmax runs in float32, or in float64 for float64 models (transformers' eager path
softmaxes float64 in float32, where the mask's float64 minimum becomes -inf and left-padded batches
turn NaN; this function does not).

Ops (plain frozen dataclasses, tensors allowed; defined and checked in ``experiments.backends.attention_ops``,
importable from here too):

* :class:`RecordAttention` -- probabilities (B, h, q, N), queries (B, h, Q, d) after rotary,
  keys/values (B, KV, K, d) before grouped-query expansion; into ``controller.records``.
* :class:`TransplantAttention` -- overwrite the probabilities of given rows/heads/query positions.
* :class:`BlockAttention` -- a blocked key gets exactly zero probability (``-inf`` before the softmax).
* :class:`ScaleQK` -- multiply some query heads' queries, or the keys those heads see, by a factor.

Order inside one attention call: ScaleQK -> logits (+ softcap) + mask -> BlockAttention -> softmax
-> TransplantAttention -> RecordAttention -> (dropout, training only) -> probabilities @ V.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from experiments.backends.attention_ops import (  # noqa: F401 - the ops are part of this module's interface
    AttentionOp,
    BlockAttention,
    Coordinates,
    IndexLike,
    RecordAttention,
    ScaleQK,
    Steps,
    TransplantAttention,
)
from experiments.backends.transformers_adapter import attention_implementation

ATTENTION_IMPLEMENTATION = "controlled_eager_attention"
"""Name under which the controllable attention function is registered (both registries)."""

_CONTROLLER_ATTR = "_attention_controller"


class UnmatchedKeysWarning(UserWarning):
    """``align_source_probs``: some (row, head, query) keeps no probability mass (all keys unmatched)."""


# ---------------------------------------------------------------------------- records / controller
@dataclass
class AttentionRecord:
    """What one :class:`RecordAttention` captured at one layer in one forward.

    ``step``: index of the forward inside the context (0 = first forward, normally the prompt pass);
    ``prompt``: whether that forward had no cached keys; ``query_offset``: cache coordinate of the
    forward's first query; ``query_positions``: the recorded query columns in cache coordinates (an op in
    prompt coordinates is converted); ``key_offset``: cache coordinate of ``key``/``value``'s first position (0
    unless a sliding-window layer dropped old keys; ``probs`` always start at coordinate 0). Tensors
    not asked for are None.
    """

    op_index: int
    layer: int
    step: int
    prompt: bool
    query_offset: int
    heads: tuple[int, ...]
    query_positions: torch.Tensor | None
    probs: torch.Tensor | None = None
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    key_offset: int = 0


@dataclass
class AttentionController:
    """Live state of one :func:`attention_control` context: the ops, the forward counter, the records."""

    model: nn.Module
    ops: tuple[AttentionOp, ...]
    num_layers: int
    num_heads: int
    records: list[AttentionRecord] = field(default_factory=list)
    step: int = -1
    pad_offsets: torch.Tensor | None = None  # (B,) each row's left padding, read off the prompt pass's mask
    _in_cache: dict[int, AttentionOp] = field(default_factory=dict)  # ops by index, converted once per prompt pass
    _last_layer: int | None = None
    _expected_keys: int | None = None  # cache length N of the current forward, when known
    _tracked: bool = False  # the context saw the prompt pass, so cache lengths can be counted

    def get(self, layer: int, step: int = 0, op_index: int | None = None) -> AttentionRecord:
        """The record of ``layer`` in forward ``step`` (``op_index`` disambiguates several record ops)."""
        hits = [r for r in self.records if r.layer == layer and r.step == step
                and (op_index is None or r.op_index == op_index)]
        if not hits:
            have = sorted({(r.layer, r.step) for r in self.records})
            raise KeyError(f"no record for layer {layer}, step {step}; recorded (layer, step) pairs: {have}")
        if len(hits) > 1:
            raise KeyError(f"{len(hits)} records for layer {layer}, step {step}; pass op_index")
        return hits[0]

    # called once per attention call
    def _begin(self, layer: int, query_len: int, key_len: int, window: int | None) -> None:
        """Advance the forward counter when layers restart; count the cache length N of the forward."""
        if self._last_layer is None or layer <= self._last_layer:
            self.step += 1
            if key_len == query_len:  # prompt pass: no cached keys
                self._tracked = True
                self._expected_keys = key_len
            elif self._tracked:
                self._expected_keys += query_len
            else:  # entered mid-generation: read N off a layer that holds every key
                self._expected_keys = None
        self._last_layer = layer
        if self._expected_keys is None and (window is None or key_len - query_len < window - 1):
            self._expected_keys = key_len  # a full layer, or a sliding one that has dropped nothing yet

    def _frame(self, layer: int, query_len: int, key_len: int, window: int | None) -> tuple[int, int]:
        """(coordinate of the first query, coordinate of the first key) of this layer in this forward."""
        total = self._expected_keys
        if total is None:
            raise RuntimeError(
                f"layer {layer} (sliding window {window}) holds {key_len} keys and no earlier layer of this forward "
                "told how many positions the cache holds (attention_control was entered mid-generation): cache "
                "coordinates are ambiguous, interventions refused; enter attention_control before the prompt pass"
            )
        if key_len == total:
            return total - query_len, 0
        if window is not None and query_len <= key_len < total and key_len - query_len >= window - 1:
            return total - query_len, total - key_len  # a sliding-window cache kept the last keys
        raise RuntimeError(
            f"layer {layer} sees {key_len} keys where the cache holds {total} positions"
            f"{'' if window is None else f' (sliding window {window})'}: cache coordinates are ambiguous, "
            "interventions refused"
        )


def _pad_offsets(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """(B,) each row's left padding in a prompt pass of ``length`` columns: the first column that sees itself
    (a padding column is masked for every query, itself included). Refuses rows whose tokens do not run from
    there to the last column (right padding, holes): prompt coordinates would be ambiguous."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long)
    allowed = _allowed_keys(attention_mask, torch.Size((batch, 1, length, length)))
    columns = torch.arange(length, device=allowed.device)
    diagonal = allowed[:, 0, columns, columns].expand(batch, -1).cpu()  # (B, T): real tokens
    offsets = torch.where(diagonal.any(-1), diagonal.int().argmax(-1), torch.full((batch,), length))
    contiguous = diagonal == (torch.arange(length)[None, :] >= offsets[:, None])
    if not bool(contiguous.all()):
        bad = int((~contiguous.all(-1)).nonzero()[0])
        raise ValueError(f"row {bad} is not left-padded (its tokens do not run to the last column): "
                         "prompt coordinates need left padding; pass cache coordinates")
    return offsets


def _shift(matrix: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(R, n) prompt coordinates of batch rows ``rows`` -> cache coordinates (-1 padding kept)."""
    offsets = offsets.to(matrix.device)[rows.to(matrix.device)]
    return torch.where(matrix >= 0, matrix + offsets[:, None], matrix)


def _names_positions(op: AttentionOp) -> bool:
    if isinstance(op, RecordAttention):
        return op.query_positions is not None
    if isinstance(op, ScaleQK):
        return op.positions is not None
    return True


#: The warning for positions given without ``coordinates=`` on a padded batch (read as cache columns).
UNSTATED_COORDINATES = ("{op}: positions given without coordinates= on a left-padded batch are read as cache columns "
                        "of the padded batch; pass coordinates='cache' to keep that, or 'prompt' for token indices of "
                        "each row's unpadded prompt (the default from the next release)")


def _in_cache_coordinates(op: AttentionOp, offsets: torch.Tensor | None, k_len: int) -> AttentionOp:
    """``op`` with its positions (and a transplant's key axis) converted from prompt to cache coordinates."""
    if op.coordinates is None:
        if offsets is not None and bool(offsets.any()) and _names_positions(op):
            warnings.warn(UNSTATED_COORDINATES.format(op=type(op).__name__), FutureWarning, stacklevel=2)
        return op
    if op.coordinates == "cache":
        return op
    if offsets is None:
        raise RuntimeError(f"{type(op).__name__} names prompt coordinates, but attention_control did not see the "
                           "prompt pass (entered mid-generation): enter it before the prompt pass")
    batch = len(offsets)
    name = type(op).__name__
    if isinstance(op, RecordAttention):
        positions = op.query_positions
        if positions is None:
            return replace(op, coordinates="cache")
        if positions.ndim == 1:
            positions = positions[None].expand(batch, -1)
        _row_targets(None, positions, batch, name)
        return replace(op, query_positions=_shift(positions, torch.arange(batch), offsets), coordinates="cache")
    if isinstance(op, ScaleQK):
        if op.positions is None:
            return replace(op, coordinates="cache")
        rows, positions = _row_targets(op.rows, op.positions, batch, name)
        return replace(op, positions=_shift(positions, rows, offsets), coordinates="cache")
    if isinstance(op, BlockAttention):
        rows, keys = _row_targets(op.rows, op.key_positions, batch, name)
        queries = op.query_positions
        if queries is not None and op.rows is None and queries.shape[0] == 1:
            queries = queries.expand(batch, -1)
        return replace(op, key_positions=_shift(keys, rows, offsets), coordinates="cache",
                       query_positions=None if queries is None else _shift(queries, rows, offsets))
    rows = _transplant_rows(op, batch, name)
    probs = op.probs.new_zeros(*op.probs.shape[:3], k_len)
    for i, row in enumerate(rows.tolist()):
        start = int(offsets[row])
        kept = min(op.probs.shape[-1], k_len - start)
        if bool(op.probs[i, ..., kept:].any()):
            raise ValueError(f"{name} at layer {op.layer}: row {row} puts probability on key {kept} or later, past "
                             f"its prompt of {k_len - start} tokens")
        probs[i, ..., start:start + kept] = op.probs[i, ..., :kept]
    return replace(op, query_positions=_shift(op.query_positions, rows, offsets), probs=probs, coordinates="cache")


def _validate_ops(ops: Sequence[AttentionOp], num_layers: int, num_heads: int) -> tuple[AttentionOp, ...]:
    checked = []
    for i, op in enumerate(ops):
        if not isinstance(op, (RecordAttention, TransplantAttention, BlockAttention, ScaleQK)):
            raise TypeError(f"op {i} is a {type(op).__name__}, not an attention op")
        layers = [op.layer] if isinstance(op, (TransplantAttention, ScaleQK)) else (op.layers or [])
        heads = op.heads or []
        for layer in layers:
            if not 0 <= layer < num_layers:
                raise ValueError(f"op {i} ({type(op).__name__}): layer {layer} out of range (model has {num_layers})")
        for head in heads:
            if not 0 <= head < num_heads:
                raise ValueError(f"op {i} ({type(op).__name__}): head {head} out of range (model has {num_heads})")
        checked.append(op)
    return tuple(checked)


@contextmanager
def attention_control(model: PreTrainedModel, ops: Sequence[AttentionOp] = ()) -> Iterator[AttentionController]:
    """Run ``model`` on the controllable attention and apply ``ops`` in every forward inside the block.

    Yields an :class:`AttentionController`; its ``records`` fill up as forwards run. The previous
    attention implementation is restored on exit, also after an exception. The ops live on this
    model's attention modules only (no global state); one context per model at a time.
    """
    register_attention()
    if getattr(model, _CONTROLLER_ATTR, None) is not None:
        raise RuntimeError("attention_control is already active on this model; nesting is not supported")
    config = model.config
    num_layers = int(config.num_hidden_layers)
    num_heads = int(config.num_attention_heads)
    controller = AttentionController(model, _validate_ops(ops, num_layers, num_heads), num_layers, num_heads)
    previous = attention_implementation(model)
    modules = list(model.modules())
    try:
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
        if attention_implementation(model) != ATTENTION_IMPLEMENTATION:
            raise RuntimeError(
                f"{type(model).__name__} does not accept attention implementation {ATTENTION_IMPLEMENTATION!r} "
                "(its attention does not dispatch through transformers' AttentionInterface)"
            )
        for module in modules:
            module.__dict__[_CONTROLLER_ATTR] = controller
        yield controller
    finally:
        for module in modules:
            module.__dict__.pop(_CONTROLLER_ATTR, None)
        if attention_implementation(model) != previous:
            model.set_attn_implementation(previous)


# ---------------------------------------------------------------------------- the attention function
def _expand_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KV, K, d) -> (B, KV*groups, K, d); query head h reads kv head h // groups."""
    if groups == 1:
        return states
    b, kv, k, d = states.shape
    return states[:, :, None, :, :].expand(b, kv, groups, k, d).reshape(b, kv * groups, k, d)


def _check_rows(rows: torch.Tensor, batch: int, what: str) -> None:
    if len(rows) and int(rows.max()) >= batch:
        raise ValueError(f"{what}: row {int(rows.max())} out of range for a batch of {batch}")


def _transplant_rows(op: TransplantAttention, batch: int, what: str) -> torch.Tensor:
    """The batch rows a transplant writes (all of them when ``rows`` is None: one row of positions each)."""
    if op.rows is None and op.query_positions.shape[0] != batch:
        raise ValueError(f"{what}: {op.query_positions.shape[0]} rows of positions for a batch of {batch} "
                         "(give rows= to patch some rows only)")
    rows = torch.arange(batch) if op.rows is None else op.rows
    _check_rows(rows, batch, what)
    return rows


def _row_targets(rows: torch.Tensor | None, matrix: torch.Tensor | None, batch: int, what: str
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resolve ``rows`` (None: all) against a per-row (R, n) matrix (R == B or 1 when rows is None)."""
    if rows is None:
        if matrix is not None and matrix.shape[0] not in (1, batch):
            raise ValueError(
                f"{what}: {matrix.shape[0]} position rows for a batch of {batch} (pass rows=, or use 1 or {batch})"
            )
        rows = torch.arange(batch)
        if matrix is not None and matrix.shape[0] == 1:
            matrix = matrix.expand(batch, -1)
    _check_rows(rows, batch, what)
    return rows, matrix


def _coordinate_hits(positions: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """(R, n) cache coordinates (-1 padding) -> (R, length) bool: which of ``start .. start+length-1`` are named."""
    local = positions - start
    valid = (positions >= 0) & (local >= 0) & (local < length)
    hits = torch.zeros(positions.shape[0], length + 1, dtype=torch.bool, device=positions.device)
    hits.scatter_(1, torch.where(valid, local, torch.full_like(local, length)), True)
    return hits[:, :length]


def _scale_factors(op: ScaleQK, batch: int, start: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, length) multipliers for one ScaleQK on the coordinates ``start .. start+length-1``."""
    rows, positions = _row_targets(op.rows, op.positions, batch, "ScaleQK")
    factors = torch.ones(batch, length, device=device)
    if positions is None:
        factors[rows.to(device)] = op.factor
    else:
        hits = _coordinate_hits(positions.to(device), start, length)
        for i, row in enumerate(rows.tolist()):
            factors[row, hits[i]] = op.factor
    return factors


def _block_mask(ops: list[BlockAttention], batch: int, heads: int, q_offset: int, k_offset: int, q_len: int,
                k_len: int, device: torch.device) -> torch.Tensor:
    """(B, H, q, K) bool: True where a BlockAttention removes the key (only keys earlier than the query).

    Query ``i`` is coordinate ``q_offset + i``, key ``j`` coordinate ``k_offset + j``.
    """
    blocked = torch.zeros(batch, heads, q_len, k_len, dtype=torch.bool, device=device)
    q_coords = q_offset + torch.arange(q_len, device=device)
    k_coords = k_offset + torch.arange(k_len, device=device)
    earlier = k_coords[None, :] < q_coords[:, None]  # (q, K): the causal rule, always applied
    for op in ops:
        rows, keys = _row_targets(op.rows, op.key_positions, batch, "BlockAttention")
        key_hit = _coordinate_hits(keys.to(device), k_offset, k_len)  # (R, K)
        hit = key_hit[:, None, :] & earlier[None]
        if op.query_positions is not None:
            qpos = op.query_positions
            if op.rows is None and qpos.shape[0] == 1:
                qpos = qpos.expand(batch, -1)
            query_hit = _coordinate_hits(qpos.to(device), q_offset, q_len)  # (R, q)
            hit = hit & query_hit[:, :, None]
        head_sel = torch.zeros(heads, dtype=torch.bool, device=device)
        head_sel[list(op.heads) if op.heads is not None else slice(None)] = True
        for i, row in enumerate(rows.tolist()):
            blocked[row] |= hit[i][None] & head_sel[:, None, None]
    return blocked


def _allowed_keys(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Bool, broadcastable to ``shape`` (B, H, Q, K): which keys the mask lets each query see.

    transformers' eager mask is additive (0 = visible, the dtype's minimum = masked); a bool mask is
    True where visible.
    """
    if attention_mask is None:
        return torch.ones((1,) * len(shape), dtype=torch.bool)
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _sliding_window(module: nn.Module, kwargs: dict[str, Any]) -> int | None:
    """The layer's sliding window (None: full attention).

    Whether the layer slides is what the model hands its attention (``sliding_window=``, else the
    module's attribute); the width is the config's ``sliding_window`` when it has one, since the
    cache (``DynamicSlidingWindowLayer``) and the mask are built from the config at every forward.
    """
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    configured = getattr(getattr(module, "config", None), "sliding_window", None)
    if isinstance(configured, int) and not isinstance(configured, bool) and configured > 0:
        return configured
    return int(window)


def controlled_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with interventions. query (B, H, Q, d); key/value (B, KV, K, d); returns
    (output (B, Q, H, d), probabilities (B, H, Q, K)). Softmax in float32 (float64 for float64
    logits), cast back to the query dtype.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    batch, num_heads, q_len, _ = query.shape
    k_len = key.shape[-2]
    groups = int(getattr(module, "num_key_value_groups", 1))
    if num_heads != key.shape[1] * groups:
        raise ValueError(f"{num_heads} query heads do not match {key.shape[1]} kv heads x {groups} groups")
    controller: AttentionController | None = module.__dict__.get(_CONTROLLER_ATTR)
    ops: list[AttentionOp] = []
    indices: list[int] = []  # each selected op's index in the controller's ops
    layer = int(getattr(module, "layer_idx", -1))
    window = _sliding_window(module, kwargs)
    prompt = k_len == q_len
    q_offset, k_offset = k_len - q_len, 0
    if controller is not None:
        first_call = controller._last_layer is None or layer <= controller._last_layer
        controller._begin(layer, q_len, k_len, window)
        if first_call and prompt and any(op.coordinates != "cache" for op in controller.ops):
            controller._in_cache.clear()
            try:
                controller.pad_offsets = _pad_offsets(attention_mask, batch, q_len)
            except ValueError:
                if any(op.coordinates == "prompt" for op in controller.ops):
                    raise
                controller.pad_offsets = None  # ops without stated coordinates read cache columns: nothing to convert
        for index, op in enumerate(controller.ops):
            if isinstance(op, RecordAttention):
                hit = layer in op.layers and (prompt or op.steps == "all")
            elif isinstance(op, TransplantAttention):
                hit = layer == op.layer and prompt
            elif isinstance(op, BlockAttention):
                hit = (op.layers is None or layer in op.layers) and (prompt or op.steps == "all")
            else:
                hit = layer == op.layer and (prompt or op.steps == "all")
            if hit:
                if index not in controller._in_cache:  # (a transplant runs in the prompt pass only: k_len = T)
                    controller._in_cache[index] = _in_cache_coordinates(op, controller.pad_offsets, k_len)
                ops.append(controller._in_cache[index])
                indices.append(index)
        if ops:
            q_offset, k_offset = controller._frame(layer, q_len, k_len, window)

    key_states = _expand_kv(key, groups)
    value_states = _expand_kv(value, groups)
    for op in ops:
        if isinstance(op, ScaleQK):
            heads = list(op.heads) if op.heads is not None else slice(None)
            if op.target == "query":
                factors = _scale_factors(op, batch, q_offset, q_len, query.device).to(query.dtype)
                query = query.clone()
                query[:, heads] = query[:, heads] * factors[:, None, :, None]
            else:
                factors = _scale_factors(op, batch, k_offset, k_len, key.device).to(key.dtype)
                key_states = key_states.clone()
                key_states[:, heads] = key_states[:, heads] * factors[:, None, :, None]

    logits = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None:
        logits = logits + attention_mask
    softmax_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    blocks = [op for op in ops if isinstance(op, BlockAttention)]
    blocked = None
    if blocks:
        allowed = _allowed_keys(attention_mask, logits.shape).to(logits.device)
        blocked = _block_mask(blocks, batch, num_heads, q_offset, k_offset, q_len, k_len, logits.device) & allowed
        if not blocked.any():
            blocked = None  # every named key is masked for its queries anyway: exactly eager attention
    if blocked is None:
        probs = nn.functional.softmax(logits, dim=-1, dtype=softmax_dtype)
    else:
        # rows a block touches: only permitted keys take part (-inf elsewhere, so a row whose every
        # visible key is blocked spreads nothing over masked columns); other rows stay as eager has them
        touched = blocked.any(-1, keepdim=True)
        permitted = allowed & ~blocked
        logits = torch.where(touched & ~permitted, float("-inf"), logits)
        probs = nn.functional.softmax(logits, dim=-1, dtype=softmax_dtype)
        probs = probs.masked_fill(touched & ~permitted.any(-1, keepdim=True), 0.0)  # attend to nothing
    probs = probs.to(query.dtype)

    for op in ops:
        if isinstance(op, TransplantAttention):
            probs = _transplant(probs, op, layer)
    for index, op in zip(indices, ops):
        if isinstance(op, RecordAttention):
            _record(controller, index, op, layer, prompt, q_offset, k_offset, probs, query, key, value)

    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value_states).transpose(1, 2).contiguous()
    return output, probs


def _transplant(probs: torch.Tensor, op: TransplantAttention, layer: int) -> torch.Tensor:
    batch, num_heads, q_len, k_len = probs.shape
    if op.probs.shape[-1] != k_len:
        raise ValueError(f"TransplantAttention at layer {layer}: probs have {op.probs.shape[-1]} keys, "
                         f"the prompt pass has {k_len}")
    op_rows = _transplant_rows(op, batch, f"TransplantAttention at layer {layer}")
    if int(op.query_positions.max()) >= q_len:
        raise ValueError(f"TransplantAttention at layer {layer}: query position {int(op.query_positions.max())} "
                         f"out of range for a prompt of {q_len} columns")
    device = probs.device
    qpos = op.query_positions.to(device)
    valid = (qpos >= 0)[:, None, :].expand(-1, len(op.heads), -1)  # (R, h, n)
    rows = op_rows.to(device)[:, None, None].expand_as(valid)
    heads = torch.tensor(op.heads, device=device)[None, :, None].expand_as(valid)
    cols = qpos[:, None, :].expand_as(valid)
    probs = probs.clone()
    probs[rows[valid], heads[valid], cols[valid]] = op.probs.to(device, probs.dtype)[valid]
    return probs


def _record(controller: AttentionController, index: int, op: RecordAttention, layer: int, prompt: bool,
            q_offset: int, k_offset: int, probs: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor) -> None:
    batch = probs.shape[0]
    heads = op.heads if op.heads is not None else tuple(range(probs.shape[1]))
    head_index = torch.tensor(heads, device=probs.device)
    positions = op.query_positions if prompt else None
    record = AttentionRecord(index, layer, controller.step, prompt, q_offset, heads,
                             positions.clone() if positions is not None else None, key_offset=k_offset)
    if "probs" in op.what:
        selected = probs.index_select(1, head_index)
        if k_offset:  # a sliding-window layer dropped the oldest keys: they get probability 0
            selected = nn.functional.pad(selected, (k_offset, 0))
        if positions is not None:
            pos = positions.to(probs.device)
            if pos.ndim == 1:
                selected = selected.index_select(2, pos)
            else:
                if pos.shape[0] != batch:
                    raise ValueError(f"RecordAttention: query_positions has {pos.shape[0]} rows for a batch of {batch}")
                idx = pos.clamp(min=0)[:, None, :, None].expand(-1, len(heads), -1, selected.shape[-1])
                selected = selected.gather(2, idx).masked_fill((pos < 0)[:, None, :, None], 0.0)
        record.probs = selected.detach()
    if "query" in op.what:
        record.query = query.index_select(1, head_index).detach()
    if "key" in op.what:
        record.key = key.detach().clone()
    if "value" in op.what:
        record.value = value.detach().clone()
    controller.records.append(record)


# ---------------------------------------------------------------------------- helpers
def align_source_probs(source_probs: torch.Tensor, key_map: torch.Tensor) -> torch.Tensor:
    """Map source attention (R, h, n, Ks) onto base keys: (R, h, n, Kb).

    Rule: base key j of row r takes the source probability of key ``key_map[r, j]``; ``-1`` (unmatched)
    gets 0; each (row, head, query) is then renormalised to sum 1 over the base keys. A source key
    named by several base keys lends its mass to each before renormalising. A (row, head, query)
    whose matched keys carry no mass stays all zero and is reported with an UnmatchedKeysWarning.
    """
    if source_probs.ndim != 4:
        raise ValueError(f"source_probs must have shape (R, h, n, Ks), got {tuple(source_probs.shape)}")
    key_map = torch.as_tensor(key_map, dtype=torch.long, device=source_probs.device)
    rows, _, _, source_keys = source_probs.shape
    if key_map.ndim != 2 or key_map.shape[0] != rows:
        raise ValueError(f"key_map must have shape ({rows}, Kb), got {tuple(key_map.shape)}")
    if (key_map < -1).any() or (key_map >= source_keys).any():
        raise ValueError(f"key_map entries must be -1 or a source key in 0..{source_keys - 1}")
    matched = key_map >= 0
    index = key_map.clamp(min=0)[:, None, None, :].expand(-1, source_probs.shape[1], source_probs.shape[2], -1)
    aligned = source_probs.gather(3, index) * matched[:, None, None, :].to(source_probs.dtype)
    total = aligned.sum(-1, keepdim=True)
    empty = total.squeeze(-1) <= 0
    if empty.any():
        where = empty.nonzero().tolist()
        warnings.warn(
            f"align_source_probs: {len(where)} (row, head, query) entries keep no mass and stay zero, "
            f"e.g. {where[:5]}", UnmatchedKeysWarning, stacklevel=2,
        )
    return torch.where(total > 0, aligned / total.clamp(min=torch.finfo(aligned.dtype).tiny), aligned)


_REGISTERED = False


def register_attention() -> str:
    """Register :data:`ATTENTION_IMPLEMENTATION` with AttentionInterface and AttentionMaskInterface (idempotent).

    The mask registration reuses transformers' eager mask (0 / dtype-min float mask): without it,
    mask creation returns no mask for an unknown name and the model would attend to the future.
    """
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTENTION_IMPLEMENTATION, controlled_attention_forward)
        AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)
        _REGISTERED = True
    return ATTENTION_IMPLEMENTATION


register_attention()
