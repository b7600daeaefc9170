"""The attention operations: plain frozen dataclasses a backend's ``attention(ops)`` runs in every forward.

* :class:`RecordAttention` -- probabilities (B, h, q, N), queries (B, h, Q, d) after rotary,
  keys/values (B, KV, K, d) before grouped-query expansion; into the controller's records.
* :class:`TransplantAttention` -- overwrite the probabilities of given rows/heads/query positions.
* :class:`BlockAttention` -- a blocked key gets exactly zero probability (``-inf`` before the softmax).
* :class:`ScaleQK` -- multiply some query heads' queries, or the keys those heads see, by a factor.

Every op takes ``steps`` ("prompt" or "all"), optional ``rows`` (None: every row), heads as one index, a list
or None (every head), -1 as padding in per-row positions, and ``coordinates`` ("prompt": token indices of
each row's unpadded prompt, then its generated tokens; "cache": columns of the padded batch; see
``experiments.backends.attention_control`` for the coordinates and for what each op does inside one attention
call). Inputs are checked here, when the op is built; layers and heads against the model when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

Steps = Literal["prompt", "all"]
Coordinates = Literal["cache", "prompt"]
IndexLike = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


# ---------------------------------------------------------------------------- input normalisation
def _as_index_vector(value: IndexLike | int | None, name: str) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = torch.as_tensor(value, dtype=torch.long)
    if tensor.ndim == 0:
        tensor = tensor[None]
    if tensor.ndim != 1:
        raise ValueError(f"{name} must be a 1-D list of indices, got shape {tuple(tensor.shape)}")
    if (tensor < 0).any():
        raise ValueError(f"{name} must be non-negative, got {tensor.tolist()}")
    return tensor


def _as_index_matrix(value: IndexLike | None, name: str) -> torch.Tensor | None:
    """(R, n) LongTensor; -1 marks padding, other negatives are rejected."""
    if value is None:
        return None
    tensor = torch.as_tensor(value, dtype=torch.long)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must have shape (rows, n), got shape {tuple(tensor.shape)}")
    if (tensor < -1).any():
        raise ValueError(f"{name} may contain -1 as padding but no other negative value, got {tensor.tolist()}")
    return tensor


def _as_indices(value: int | Sequence[int] | None, name: str, what: str) -> tuple[int, ...] | None:
    """One index or a list of them as a non-empty tuple of non-negative ints (None stays None: every one)."""
    if value is None:
        return None
    indices = (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
    if not indices or min(indices) < 0:
        raise ValueError(f"{name} must be a non-empty list of non-negative {what} indices, got {indices}")
    return indices


def _as_layers(value: int | Sequence[int] | None, name: str = "layers") -> tuple[int, ...] | None:
    return _as_indices(value, name, "layer")


def _as_heads(value: int | Sequence[int] | None, name: str = "heads") -> tuple[int, ...] | None:
    heads = _as_indices(value, name, "head")
    if heads is not None and len(set(heads)) != len(heads):
        raise ValueError(f"{name} contains a repeated head: {heads}")
    return heads


def _check_steps(steps: str, coordinates: str | None = None) -> None:
    if steps not in ("prompt", "all"):
        raise ValueError(f"steps must be 'prompt' or 'all', got {steps!r}")
    if coordinates not in ("cache", "prompt", None):
        raise ValueError(f"coordinates must be 'cache' (padded-batch columns) or 'prompt' (token indices of each "
                         f"row's unpadded prompt), got {coordinates!r}")


# ---------------------------------------------------------------------------- ops
@dataclass(frozen=True, eq=False)
class RecordAttention:
    """Record per layer: ``"probs"`` (B, h_sel, q_sel, K), ``"query"`` (B, h_sel, Q, d) after rotary
    (and after any ScaleQK), ``"key"``/``"value"`` (B, KV, K, d) before grouped-query expansion.

    ``heads`` selects query heads for probs and queries (None: all). ``query_positions`` selects the
    prompt-pass query columns of ``probs``: a list shared by all rows, or a (B, n) per-row tensor
    (None: all; -1 pads a row of the (B, n) form, as in the other operations, and records zeros); decoding steps
    always record their new queries. Padding key columns get
    probability 0 (masked) for every real query; a padding query (every key masked) holds eager
    attention's uniform spread. ``steps="prompt"`` records the prompt pass only, ``"all"`` every forward.

    ``probs`` always span every cache coordinate ``0 .. N-1``: at a sliding-window layer that no longer
    holds the oldest keys those columns are 0 (outside the window). ``key``/``value`` hold the keys the
    layer has; the record's ``key_offset`` is the coordinate of their first one.
    """

    layers: int | Sequence[int]
    heads: int | Sequence[int] | None = None
    query_positions: IndexLike | None = None
    what: tuple[str, ...] = ("probs",)
    steps: Steps = "prompt"
    coordinates: Coordinates | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _as_layers(self.layers))
        object.__setattr__(self, "heads", _as_heads(self.heads))
        what = (self.what,) if isinstance(self.what, str) else tuple(self.what)
        unknown = set(what) - {"probs", "query", "key", "value"}
        if unknown or not what:
            raise ValueError(f"what must be a non-empty subset of ('probs', 'query', 'key', 'value'), got {what}")
        object.__setattr__(self, "what", what)
        _check_steps(self.steps, self.coordinates)
        qp = self.query_positions
        if qp is not None:
            tensor = torch.as_tensor(qp, dtype=torch.long)
            if tensor.ndim not in (1, 2) or (tensor < (0 if tensor.ndim == 1 else -1)).any():
                raise ValueError("query_positions must be a list of non-negative columns or a (B, n) tensor of them "
                                 "(-1 = padding: that slot records zeros)")
            object.__setattr__(self, "query_positions", tensor)


@dataclass(frozen=True, eq=False)
class TransplantAttention:
    """Replace probabilities in the prompt pass: ``probs`` (R, len(heads), n, K) is written to batch rows
    ``rows`` (R,; None: every row, R = the batch size, as in the other operations), query columns
    ``query_positions`` (R, n; -1 = skip) and query ``heads`` of ``layer``, before multiplying by V. In cache
    coordinates ``K`` must equal the prompt width; in prompt coordinates key k is each row's token k (K may be
    any width; mass on keys past a row's prompt is refused). ``steps`` is ``"prompt"``, the
    only pass whose keys the probabilities describe (the option exists so every operation reads alike).
    """

    layer: int
    heads: int | Sequence[int]
    rows: IndexLike | None
    query_positions: IndexLike
    probs: torch.Tensor
    steps: Steps = "prompt"
    coordinates: Coordinates | None = None

    def __post_init__(self) -> None:
        _check_steps(self.steps, self.coordinates)
        if self.steps != "prompt":
            raise ValueError("TransplantAttention acts on the prompt pass only (its probabilities span the prompt's "
                             f"keys): steps must be 'prompt', got {self.steps!r}")
        if int(self.layer) < 0:
            raise ValueError(f"layer must be non-negative, got {self.layer}")
        object.__setattr__(self, "heads", _as_heads(self.heads))
        rows = _as_index_vector(self.rows, "rows")
        qpos = _as_index_matrix(self.query_positions, "query_positions")
        probs = torch.as_tensor(self.probs)
        n_rows = qpos.shape[0] if rows is None else len(rows)
        expected = (n_rows, len(self.heads), qpos.shape[1])
        if qpos.shape[0] != n_rows:
            raise ValueError(f"query_positions has {qpos.shape[0]} rows but rows has {n_rows}")
        if probs.ndim != 4 or tuple(probs.shape[:3]) != expected:
            raise ValueError(
                f"probs must have shape (rows, heads, n, K) = ({expected[0]}, {expected[1]}, {expected[2]}, K), "
                f"got {tuple(probs.shape)}"
            )
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "query_positions", qpos)
        object.__setattr__(self, "probs", probs)


@dataclass(frozen=True, eq=False)
class BlockAttention:
    """Give keys at ``key_positions`` (R, m; -1 = padding; ``coordinates``) exactly zero probability.

    ``rows`` (R,) picks the batch rows (None: all rows; then R is the batch size, or 1 to apply the
    same keys to every row). ``layers``/``heads``: None = all.

    The causal rule always holds: a query loses a key only when the key is strictly earlier
    (key coordinate < query coordinate). A query is never blocked from itself or from a later key
    (those pairs are silently ignored, with or without ``query_positions``). ``query_positions``
    (R, n; -1 padding; ``coordinates``) restricts *which* queries lose the keys; None means every
    query, in the prompt pass and in every decoding step (``steps="all"``, the default) or in the prompt pass
    only (``steps="prompt"``).

    Blocking a key that a query cannot see anyway (padding, future, outside its sliding window,
    dropped from a sliding-window cache) changes nothing. A query whose every visible key ends up
    blocked attends to nothing (an all-zero probability row, zero attention output) -- never to
    masked columns. Under the causal rule that needs a query whose own column is masked (e.g. a
    0 inside a row's attention mask); padding queries are left as eager attention has them.
    """

    key_positions: IndexLike
    rows: IndexLike | None = None
    query_positions: IndexLike | None = None
    layers: int | Sequence[int] | None = None
    heads: int | Sequence[int] | None = None
    steps: Steps = "all"
    coordinates: Coordinates | None = None

    def __post_init__(self) -> None:
        _check_steps(self.steps, self.coordinates)
        keys = _as_index_matrix(self.key_positions, "key_positions")
        rows = _as_index_vector(self.rows, "rows")
        qpos = _as_index_matrix(self.query_positions, "query_positions")
        if rows is not None and len(rows) != keys.shape[0]:
            raise ValueError(f"key_positions has {keys.shape[0]} rows but rows has {len(rows)}")
        if qpos is not None and qpos.shape[0] != keys.shape[0]:
            raise ValueError(f"query_positions has {qpos.shape[0]} rows but key_positions has {keys.shape[0]}")
        object.__setattr__(self, "key_positions", keys)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "query_positions", qpos)
        object.__setattr__(self, "layers", _as_layers(self.layers))
        object.__setattr__(self, "heads", _as_heads(self.heads))


@dataclass(frozen=True, eq=False)
class ScaleQK:
    """Multiply the queries of query heads ``heads`` of ``layer`` (``target="query"``) or the keys those
    heads see (``target="key"``: each head's own copy; other heads sharing its kv head are untouched) by
    ``factor``, after rotary, before the logits. ``heads``: one head or a list (None: every head).

    ``positions``: None = all positions; else (R, n) positions per row (-1 padding; ``coordinates``) for
    batch rows ``rows`` (R,) (None: all rows; then R is the batch size or 1). Queries are scaled at
    the query positions present in a forward, keys at the key positions. ``steps``: "all" (default)
    or "prompt".
    """

    layer: int
    heads: int | Sequence[int] | None
    target: Literal["query", "key"]
    factor: float
    positions: IndexLike | None = None
    rows: IndexLike | None = None
    steps: Steps = "all"
    coordinates: Coordinates | None = None

    def __post_init__(self) -> None:
        if int(self.layer) < 0:
            raise ValueError(f"layer must be non-negative, got layer={self.layer}")
        object.__setattr__(self, "heads", _as_heads(self.heads))
        if self.target not in ("query", "key"):
            raise ValueError(f"target must be 'query' or 'key', got {self.target!r}")
        _check_steps(self.steps, self.coordinates)
        positions = _as_index_matrix(self.positions, "positions")
        rows = _as_index_vector(self.rows, "rows")
        if rows is not None and positions is not None and positions.shape[0] != len(rows):
            raise ValueError(f"positions has {positions.shape[0]} rows but rows has {len(rows)}")
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "factor", float(self.factor))


AttentionOp = RecordAttention | TransplantAttention | BlockAttention | ScaleQK
