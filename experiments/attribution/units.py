"""Attribution patching of every unit kind: residual stream, attention output, MLP output, single heads and
single heads' attention patterns, at any token positions; first-order estimates (AtP, with the AtP* corrections)
and exact effects on the same teacher-forced metric.

Metric, per pair (base prompt x, labels from a hypothesis; answers scored whole, teacher-forced):
``M(x) = log p(cf_label | x) - log p(base_label | x)``, each label's tokens summed. Every pair is two rows,
``x + cf_label`` and ``x + base_label``; one forward and one backward of the 2N rows give M and its gradient.

Cells (`AttributionCell`), what one cell patches (base <- source, at the base tokens of ``position``, read at
the source tokens of the same position):

- ``residual``: the residual stream after block ``layer`` (-1: the embeddings), as `ResidualStream`;
- ``attention`` / ``mlp``: block ``layer``'s attention / MLP sublayer output (what it adds to the residual);
- ``head``: one query head's slice of the input of the attention output projection (`AttentionHead`; the
  usual AtP head unit). The head estimates of a layer sum to its attention-output estimate (the projection is
  linear); their exact effects do not sum to anything in general;
- ``pattern``: one head's attention probabilities at the query tokens of ``position``, the engine's
  ``attention_transplant``: the source's probabilities (keys aligned by unpadded index, keys after the query
  dropped and rows renormalised), values stay the base's.

Estimates (all from one source pass and one base forward/backward):

- AtP: ``(a_source - a_base) · dM/da`` summed over the cell's tokens, per pair (both rows' gradients);
- AtP* QK fix (``pattern`` cells): ``sum_keys (A_new - A) · dM/dA``, the exact softmax change times the gradient
  with respect to the probabilities, with ``dM/dA[t, s] = dM/dz[t] · v[s]`` (z: the head's output, v: its values).
  `AttributionResult.linearised` keeps the plain AtP term linearised through the softmax,
  ``sum_keys dM/dlogit · (log A_new - log A)`` (logits move by the log-probability change up to a per-row
  constant, which the softmax's gradient ignores): near a saturated softmax it is near zero whatever the patch.
  For the activation units (residual, attention, MLP, head) the patched value is itself computed exactly by the
  source pass, so there is no softmax between the patch and the value: their AtP and AtP* estimates coincide
  (a head's output is linear in its pattern for fixed values, so splitting its change into a query-key part and
  a value part and fixing the first gives the same sum). Saturated softmaxes *downstream* of a patch are
  linearised by every estimate here;
- path gradients (``path_steps=k``; integrated gradients per site): the activation cells' gradient averaged over
  k midpoints of the straight path from the base to the source activations, every cell column of a site moved
  together (k forwards and backwards per site). Where a site has one cell the estimate tends to the exact effect
  as k grows (the path integral of the gradient is the change); with several at distinct columns, their estimates
  add up to the joint patch's change (cells sharing a column each count it). It follows the metric through
  saturation, which the first-order term cannot. GradDrop below stays the plain estimate's;
- GradDrop (``graddrop=True``, one more forward/backward per layer): for each layer l the estimate with no
  gradient flowing back through layer l's attention and MLP outputs (its contribution to the residual), shape
  (L, C, N). `AttributionResult.graddrop_score` is the AtP* combination ``sum_l |AtP_-l| / (L - 1)``;
  `AttributionResult.cancellation` is ``max_l |AtP_-l - AtP|``: large where paths through some layer cancel in
  the plain estimate.

The metric's parts: the cf rows' term alone is the estimated change of log p(cf label) (``toward``); the result
also keeps the unpatched log-probabilities of both labels and whether the unpatched teacher-forced argmax spells
each label, for rankings that target the verdict (`experiments.attribution.screen`). `exact_rows` gives the exact
patched log-probabilities of both labels, `effects` turns them into exact effects on the metric or its cf part.

Gradients flow only where needed: the parameters never require grad during the pass, and the gradient starts
at the earliest activation any cell reads (a leaf there), so nothing below it is differentiated.

Exact effects patch the cells (many cells × 2N rows per forward, ``max_rows_per_forward``) and rerun the same
teacher-forced rows; pattern cells run under `experiments.backends.attention_control` (controlled eager attention).

Known failures of the estimate: a patch that moves an activation far from the base (whole input-token vectors
at the embeddings, several answer flips) leaves the region where the first-order term describes the change; when
the answer flips, the log-probability metric saturates and the estimate is typically many times too small (or
of the wrong sign); softmaxes downstream of the patched unit are linearised; effects through different paths
can cancel in the sum (GradDrop exposes those). Rank with the estimate, decide with exact patching
(`experiments.attribution.screen`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from experiments.backends.architectures import family_of, get_module, head_width
from experiments.backends.attention_control import RecordAttention, TransplantAttention, align_source_probs
from experiments.backends import backend_with
from experiments.engine.intervention_engine import Cell
from experiments.engine.model_units import (
    AttentionHead,
    AttentionOutput,
    AttentionPattern,
    MLPOutput,
    ModelUnit,
    ResidualStream,
)
from experiments.pipeline import LMPipeline
from experiments.backends.sites import Site, SiteEdit
from experiments.token_positions import TokenPosition, TokenPositionError

UnitKind = Literal["residual", "attention", "mlp", "head", "pattern"]
UNIT_KINDS: tuple[str, ...] = ("residual", "attention", "mlp", "head", "pattern")
#: forward order of the components inside one block (the earliest needed one becomes the gradient's leaf)
_ORDER = {"block_input": 0, "head_attention_value_output": 1, "attention_output": 2, "mlp_output": 3,
          "block_output": 4}
_HEAD = "head_attention_value_output"


@dataclass(frozen=True)
class AttributionCell:
    """One cell: a unit ``kind`` at ``layer`` (-1 only for the residual stream: the embeddings), one ``head``
    (``head`` and ``pattern`` only), at the tokens of ``position``."""

    kind: UnitKind
    layer: int
    position: TokenPosition
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS:
            raise ValueError(f"unknown unit kind {self.kind!r}; known: {', '.join(UNIT_KINDS)}")
        if (self.kind in ("head", "pattern")) != (self.head is not None):
            raise ValueError(f"{self.kind} cells {'need' if self.kind in ('head', 'pattern') else 'take no'} a head")
        if self.layer < (-1 if self.kind == "residual" else 0):
            raise ValueError(f"{self.kind} cell: layer {self.layer} out of range")

    @property
    def cell_id(self) -> str:
        """``L{l}@p`` (residual, as `PatchResidualStream`), ``L{l}.attn@p``, ``L{l}.mlp@p``, ``L{l}H{h}@p``
        (as `PatchAttentionHeads`), ``L{l}H{h}.pattern@p``."""
        suffix = {"residual": "", "attention": ".attn", "mlp": ".mlp", "head": f"H{self.head}",
                  "pattern": f"H{self.head}.pattern"}[self.kind]
        return f"L{self.layer}{suffix}@{self.position.id}"

    @property
    def unit(self) -> ModelUnit:
        """The project's model unit of this cell (what the engine patches)."""
        if self.kind == "residual":
            return ResidualStream(self.layer, self.position)
        if self.kind == "attention":
            return AttentionOutput(self.layer, self.position)
        if self.kind == "mlp":
            return MLPOutput(self.layer, self.position)
        if self.kind == "head":
            return AttentionHead(self.layer, int(self.head), self.position)
        return AttentionPattern(self.layer, self.position, head=self.head)

    @property
    def site(self) -> Site:
        """The activation the estimate reads: a pattern cell reads its head's output (for dM/dz)."""
        return Site(self.layer, _HEAD) if self.kind == "pattern" else self.unit.site

    def engine_cell(self) -> Cell:
        """The engine's cell for exact interchange (``attention_transplant`` for a pattern cell)."""
        kind = "attention_transplant" if self.kind == "pattern" else "interchange"
        return Cell(self.cell_id, [self.unit], kind=kind)


def sweep_cells(pipeline: LMPipeline, positions: Sequence[TokenPosition],
                kinds: Sequence[str] = ("residual", "attention", "mlp", "head"),
                layers: Sequence[int] | None = None) -> list[AttributionCell]:
    """Every cell of ``kinds`` at every layer (residual: -1 too) × head (head, pattern) × position, kind-major."""
    chosen = list(range(pipeline.num_layers)) if layers is None else list(layers)
    out: list[AttributionCell] = []
    for kind in kinds:
        for layer in ([-1] + chosen if kind == "residual" and layers is None else chosen):
            for head in (range(pipeline.num_heads) if kind in ("head", "pattern") else [None]):
                out += [AttributionCell(kind, layer, p, head) for p in positions]  # type: ignore[arg-type]
    return out


@dataclass
class AttributionResult:
    """Per (cell, pair), all (C, N): ``estimates`` the first-order effects on the metric (AtP; AtP* QK fix for
    pattern cells); ``exact`` when computed. ``metric_base`` (N,) the unpatched metric; ``informative`` (N,) pairs
    whose two labels differ (the others have M = 0 and every effect 0). ``linearised`` (C, N): the estimate
    linearised through the softmax (differs from ``estimates`` for pattern cells only). ``graddrop`` (L, C, N):
    the estimates with layer l's gradient dropped.

    The metric's two parts, for rankings that target the verdict (`experiments.attribution.screen`): ``toward``
    (C, N) the estimated change of log p(cf label) alone (the cf rows' term; ``estimates - toward`` is the
    estimated change of -log p(base label)); ``logp_cf`` / ``logp_base`` (N,) the unpatched log-probabilities of
    the two labels (``metric_base = logp_cf - logp_base``); ``greedy_cf`` / ``greedy_base`` (N,) whether the
    unpatched network's teacher-forced argmax spells the cf / the base label (its own greedy answer, up to what
    follows the label). ``exact_toward`` (C, N): the exact change of log p(cf label), when computed."""

    cell_ids: list[str]
    estimates: np.ndarray
    metric_base: np.ndarray
    informative: np.ndarray
    exact: np.ndarray | None = None
    linearised: np.ndarray | None = None
    graddrop: np.ndarray | None = None
    toward: np.ndarray | None = None
    logp_cf: np.ndarray | None = None
    logp_base: np.ndarray | None = None
    greedy_cf: np.ndarray | None = None
    greedy_base: np.ndarray | None = None
    exact_toward: np.ndarray | None = None

    #: the per-pair arrays (pairs on the last axis)
    PAIR_ARRAYS = ("estimates", "metric_base", "informative", "exact", "linearised", "graddrop", "toward", "logp_cf",
                   "logp_base", "greedy_cf", "greedy_base", "exact_toward")

    def take(self, pairs: np.ndarray | slice) -> "AttributionResult":
        """The result restricted to ``pairs`` (indices or a slice of the pairs)."""
        arrays = {k: (None if getattr(self, k) is None else np.asarray(getattr(self, k))[..., pairs])
                  for k in self.PAIR_ARRAYS}
        return AttributionResult(list(self.cell_ids), **arrays)

    @staticmethod
    def concat(parts: Sequence["AttributionResult"]) -> "AttributionResult":
        """The results of consecutive chunks of pairs (same cells) as one."""
        arrays = {k: (None if getattr(parts[0], k) is None
                      else np.concatenate([np.asarray(getattr(r, k)) for r in parts], -1))
                  for k in AttributionResult.PAIR_ARRAYS}
        return AttributionResult(list(parts[0].cell_ids), **arrays)

    @property
    def graddrop_score(self) -> np.ndarray:
        """(C, N) AtP* GradDrop combination ``sum_l |AtP_-l| / (L - 1)``."""
        if self.graddrop is None:
            raise ValueError("estimated without graddrop=True")
        return np.abs(self.graddrop).sum(0) / max(1, self.graddrop.shape[0] - 1)

    @property
    def cancellation(self) -> np.ndarray:
        """(C, N) ``max_l |AtP_-l - AtP|``: how much some layer's paths cancel in the plain estimate."""
        if self.graddrop is None:
            raise ValueError("estimated without graddrop=True")
        return np.abs(self.graddrop - self.estimates[None]).max(0)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A head site's (B, T, H, d_head) activation as (B, T, H·d_head); other sites unchanged."""
    return t.flatten(2) if t.ndim == 4 else t


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """No parameter requires grad inside the block (restored after): no weight gradient is ever computed."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class TeacherForcedMetric:
    """The metric's plumbing: answer token ids, left-padded prompt + answer rows, answers' log-probabilities."""

    def __init__(self, pipeline: LMPipeline):
        self.pipeline = pipeline

    def answer_ids(self, label: Any) -> list[int]:
        ids = self.pipeline.tokenizer(str(label), add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"label {label!r} has no tokens")
        return list(ids)

    def teacher_forced_inputs(self, prompts: Sequence[dict[str, Any]], answers: Sequence[list[int]]
                              ) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
        """Left-padded prompt + answer sequences; per row the column of prompt token 0 and the answer length."""
        rows = [list(self.pipeline.tokenize_one(p)["input_ids"]) + a for p, a in zip(prompts, answers)]
        width = max(map(len, rows))
        pad = self.pipeline.tokenizer.pad_token_id
        device = self.pipeline.device
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            ids[b, width - len(row):] = torch.tensor(row, device=device)
            mask[b, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        starts = [width - len(row) for row in rows]
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}, starts, [len(a) for a in answers]

    def answer_logprob(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        """(B,) summed log-probabilities of each row's last ``lengths[b]`` tokens (teacher-forced); ``logits``
        (B, T, V) of the whole rows."""
        k = max(lengths)
        return self.scored(logits[:, -k - 1 : -1], inputs, lengths)

    @staticmethod
    def scored(window: torch.Tensor, inputs: dict[str, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        """(B,) as `answer_logprob`, from ``window`` (B, k, V): the logits predicting the rows' last k tokens."""
        return TeacherForcedMetric.scored_greedy(window, inputs, lengths)[0]

    @staticmethod
    def scored_greedy(window: torch.Tensor, inputs: dict[str, torch.Tensor], lengths: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) `scored`, and (B,) whether every answer token is the argmax of its logits (the row's answer is
        what greedy decoding writes first)."""
        k = window.shape[1]
        logp = torch.log_softmax(window.float(), dim=-1)
        answer = inputs["input_ids"][:, -k:]
        token = logp.gather(-1, answer[..., None])[..., 0]  # (B, k)
        n = torch.tensor(lengths, device=window.device)[:, None]
        keep = torch.arange(k, device=window.device)[None, :] >= k - n
        greedy = ((window.argmax(-1) == answer) | ~keep).all(-1)
        return torch.where(keep, token, torch.zeros_like(token)).sum(-1), greedy

    def row_scores(self, inputs: dict[str, torch.Tensor], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) `answer_logprob` and (B,) greedy flags (`scored_greedy`) of one forward that projects only the
        answer-predicting columns."""
        k = max(lengths)
        pipeline = self.pipeline
        if pipeline.projects_last_only:
            hidden = pipeline.model.base_model(**inputs, use_cache=False).last_hidden_state
            return self.scored_greedy(pipeline.project(hidden[:, -k - 1 : -1]), inputs, lengths)
        return self.scored_greedy(pipeline.model(**inputs, use_cache=False).logits[:, -k - 1 : -1], inputs, lengths)

    def row_logprobs(self, inputs: dict[str, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        """(B,) `answer_logprob` of one forward that projects only the answer-predicting columns."""
        return self.row_scores(inputs, lengths)[0]


@dataclass
class _SiteAction:
    """What a hook does to one site's tensor in one forward, in order: write ``patches``, make it a ``leaf``
    (gradient starts here) or keep its grad, ``keep`` it in the store, pass it on detached (``drop``)."""

    keep: bool = False
    leaf: bool = False
    drop: bool = False
    patches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = field(default_factory=list)


@dataclass
class _Pass:
    """One teacher-forced forward (and backward) of the 2N rows: activations and gradients per site (B, T, d),
    per pattern layer the probabilities (B, H, T, T) and values (B, KV, T, d_head), the per-row log-probs."""

    acts: dict[Site, torch.Tensor]
    grads: dict[Site, torch.Tensor]
    probs: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    logprobs: torch.Tensor
    greedy: torch.Tensor


@dataclass
class PreparedPairs:
    """N pairs made ready once: the 2N teacher-forced rows (row i: base i + cf label, row N + i: base i + base
    label), the source prompts' activations at every needed site (N, Ts, d) and attention probabilities of every
    pattern layer (N, H, Ts, Ts), and per token position the columns of both sides."""

    bases: list[dict[str, Any]]
    sources: list[dict[str, Any]]
    inputs: dict[str, torch.Tensor]
    starts: list[int]
    lengths: list[int]
    informative: np.ndarray
    source_acts: dict[Site, torch.Tensor]
    source_probs: dict[int, torch.Tensor]
    source_offsets: list[int]
    source_lengths: list[int]
    _columns: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _transplants: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    _key_map: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return len(self.bases)

    @property
    def pair_of_row(self) -> torch.Tensor:
        return torch.arange(2 * self.n_pairs, device=self.inputs["input_ids"].device) % self.n_pairs

    @property
    def signs(self) -> torch.Tensor:
        n = self.n_pairs
        return torch.cat([torch.ones(n), -torch.ones(n)]).to(self.inputs["input_ids"].device)

    def columns(self, position: TokenPosition) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row (2N, n): the base columns in the teacher-forced rows, the source columns in the source batch,
        and a mask of real entries (rows select different token counts; padding repeats the last entry)."""
        key = id(position)
        if key not in self._columns:
            base_idx, src_idx = [], []
            for i, (base, source) in enumerate(zip(self.bases, self.sources)):
                b, s = position.index(base), position.counterfactual_index(source)
                if len(b) != len(s):
                    raise TokenPositionError(f"token position {position.id!r} selects {len(b)} token(s) in the base "
                                             f"{base.get('raw_input')!r} but {len(s)} in the source "
                                             f"{source.get('raw_input')!r}; an interchange needs equally many")
                base_idx.append(b)
                src_idx.append([j + self.source_offsets[i] for j in s])
            n = self.n_pairs
            width = max(map(len, base_idx))
            pad = lambda ix: ix + [ix[-1]] * (width - len(ix))  # noqa: E731
            device = self.inputs["input_ids"].device
            base_cols = torch.tensor([pad([j + self.starts[r] for j in base_idx[r % n]]) for r in range(2 * n)],
                                     device=device)
            src_cols = torch.tensor([pad(src_idx[r % n]) for r in range(2 * n)], device=device)
            mask = torch.tensor([[k < len(base_idx[r % n]) for k in range(width)] for r in range(2 * n)],
                                device=device)
            self._columns[key] = (base_cols, src_cols, mask)
        return self._columns[key]

    def transplanted(self, layer: int, head: int, position: TokenPosition) -> torch.Tensor:
        """(2N, n, T) the probabilities an ``attention_transplant`` of ``head`` at ``position`` writes in each
        teacher-forced row: the source's, keys aligned by unpadded index, keys after the query dropped, rows
        renormalised (as the engine's transplant)."""
        key = (layer, head, id(position))
        if key not in self._transplants:
            base_cols, src_cols, _ = self.columns(position)
            picked = self.source_probs[layer][:, head][self.pair_of_row[:, None], src_cols]  # (2N, n, Ts)
            aligned = align_source_probs(picked[:, None], self.key_map)[:, 0]  # (2N, n, T)
            keys = torch.arange(aligned.shape[-1], device=aligned.device)
            aligned = aligned * (keys[None, None, :] <= base_cols[:, :, None]).to(aligned.dtype)
            total = aligned.sum(-1, keepdim=True)
            self._transplants[key] = torch.where(total > 0, aligned / total.clamp(min=torch.finfo(aligned.dtype).tiny),
                                                 aligned)
        return self._transplants[key]

    @property
    def key_map(self) -> torch.Tensor:
        """(2N, T) per teacher-forced row and column, the source column holding the same unpadded prompt index
        (-1: none)."""
        if self._key_map is None:
            width = self.inputs["input_ids"].shape[1]
            device = self.inputs["input_ids"].device
            self._key_map = torch.full((2 * self.n_pairs, width), -1, dtype=torch.long, device=device)
            for r in range(2 * self.n_pairs):
                i = r % self.n_pairs
                stop = min(width, self.starts[r] + self.source_lengths[i])
                self._key_map[r, self.starts[r]:stop] = (torch.arange(stop - self.starts[r], device=device)
                                                         + self.source_offsets[i])
        return self._key_map


class UnitAttribution(TeacherForcedMetric):
    """AtP / AtP* estimates and exact effects of `AttributionCell`s of one pipeline (site edits of a backend
    declaring ``"edits"``). ``max_rows_per_forward``: rows (cells × 2N) per exact forward."""

    def __init__(self, pipeline: LMPipeline, cells: Sequence[AttributionCell], max_rows_per_forward: int = 512):
        super().__init__(pipeline)
        model = pipeline.model
        self.family = family_of(model)
        self.layers = get_module(model, self.family.layers)
        self.n_layers = len(self.layers)
        self.n_heads = int(pipeline.num_heads)
        self.d_head = head_width(model)
        self.groups = self.n_heads // int(getattr(model.config, "num_key_value_heads", None) or self.n_heads)
        self.max_rows_per_forward = max_rows_per_forward
        self.backend = backend_with("edits", model)
        if "attention" not in self.backend.operations:  # pragma: no cover - the default backend has both
            raise RuntimeError("attribution needs a backend with the attention operation")
        self.cells = list(cells)
        ids = [c.cell_id for c in self.cells]
        if len(set(ids)) != len(ids):
            raise ValueError("cell ids must be unique")
        for cell in self.cells:
            cell.unit.validate(pipeline)
            if cell.layer >= self.n_layers:
                raise ValueError(f"cell {cell.cell_id}: layer {cell.layer} out of range")

    # ------------------------------------------------------------------ site edits
    def _edits(self, actions: dict[Site, _SiteAction], store: dict[Site, torch.Tensor]) -> list[SiteEdit]:
        """One backend site edit per site: patch, make a leaf, keep (with its gradient) or cut the gradient.
        Head sites are seen (B, T, H, d_head) and kept so (`_flat` gives (B, T, H·d_head))."""
        def make(site: Site, action: _SiteAction) -> Callable[[torch.Tensor], torch.Tensor | None]:
            def edit(t: torch.Tensor) -> torch.Tensor | None:
                new = None
                if action.patches:
                    t = t.clone()
                    for rows, cols, heads, values in action.patches:
                        index = (rows, cols, heads) if heads is not None else (rows, cols)
                        t[index] = values.to(t.dtype)
                    new = t
                if action.leaf:
                    t = t.detach().requires_grad_(True)
                    new = t
                elif action.keep and t.requires_grad:
                    t.retain_grad()
                if action.keep:
                    store[site] = t
                if action.drop:
                    new = t.detach()
                return new
            return edit

        return [SiteEdit(site, make(site, action)) for site, action in actions.items()]

    @contextmanager
    def _hooked(self, actions: dict[Site, _SiteAction], store: dict[Site, torch.Tensor], ops: Sequence[Any] = ()
                ) -> Iterator[Any]:
        """The site edits of ``actions`` (and, with ``ops``, controlled attention) for the forwards inside the
        block."""
        with self.backend.edits(self._edits(actions, store)):
            with (self.backend.attention(ops) if ops else nullcontext()) as control:
                yield control

    # ------------------------------------------------------------------ preparation
    def _sites(self, cells: Sequence[AttributionCell]) -> list[Site]:
        return sorted({c.site for c in cells}, key=lambda s: (s.layer, _ORDER[s.component]))

    def prepare(self, bases: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]], base_labels: Sequence[Any],
                cf_labels: Sequence[Any]) -> PreparedPairs:
        """Tokenise the 2N teacher-forced rows; run the sources once (activations at every site, probabilities
        of every pattern layer)."""
        n = len(bases)
        if not (len(sources) == len(base_labels) == len(cf_labels) == n) or n == 0:
            raise ValueError("bases, sources and both label lists must have the same, non-zero length")
        answers = [self.answer_ids(x) for x in cf_labels] + [self.answer_ids(x) for x in base_labels]
        inputs, starts, lengths = self.teacher_forced_inputs(list(bases) + list(bases), answers)
        informative = np.array([str(a) != str(b) for a, b in zip(cf_labels, base_labels)])
        batch = self.pipeline.load(sources)
        store: dict[Site, torch.Tensor] = {}
        actions = {s: _SiteAction(keep=True) for s in self._sites([c for c in self.cells if c.kind != "pattern"])}
        pattern_layers = sorted({c.layer for c in self.cells if c.kind == "pattern"})
        ops = [RecordAttention(pattern_layers, what=("probs",))] if pattern_layers else []
        with torch.no_grad(), frozen_parameters(self.pipeline.model), self._hooked(actions, store, ops) as control:
            self.pipeline.model.base_model(**batch.model_inputs(), use_cache=False)
        probs = {layer: control.get(layer).probs for layer in pattern_layers} if ops else {}
        return PreparedPairs(list(bases), list(sources), inputs, starts, lengths, informative,
                             {s: _flat(t.detach()) for s, t in store.items()}, probs, list(batch.pad_offsets),
                             list(batch.lengths))

    # ------------------------------------------------------------------ estimates
    def _gradient_pass(self, pairs: PreparedPairs, drop_layer: int | None = None) -> _Pass:
        """Forward and backward of the 2N rows; the gradient starts at the earliest site; with ``drop_layer`` no
        gradient flows back through that layer's attention and MLP outputs."""
        sites = self._sites(self.cells)
        actions = {s: _SiteAction(keep=True) for s in sites}
        actions[sites[0]].leaf = True
        if drop_layer is not None:
            for component in ("attention_output", "mlp_output"):
                actions.setdefault(Site(drop_layer, component), _SiteAction()).drop = True
        pattern_layers = sorted({c.layer for c in self.cells if c.kind == "pattern"})
        ops = [RecordAttention(pattern_layers, what=("probs", "value"))] if pattern_layers else []
        store: dict[Site, torch.Tensor] = {}
        with frozen_parameters(self.pipeline.model), torch.enable_grad(), self._hooked(actions, store, ops) as control:
            logprobs, greedy = self.row_scores(pairs.inputs, pairs.lengths)
            if logprobs.requires_grad:  # (not when every path from the leaf is dropped)
                (logprobs * pairs.signs).sum().backward()
        grads = {s: _flat(store[s].grad if store[s].grad is not None else torch.zeros_like(store[s])) for s in sites}
        records = {layer: control.get(layer) for layer in pattern_layers} if ops else {}
        return _Pass({s: _flat(store[s].detach()) for s in sites}, grads, {k: r.probs for k, r in records.items()},
                     {k: r.value for k, r in records.items()}, logprobs.detach(), greedy)

    def _path_gradient(self, pairs: PreparedPairs, run: _Pass, site: Site, steps: int) -> torch.Tensor:
        """dM/da at ``site`` (2N, T, width) averaged over ``steps`` points of the straight path from the base to the
        source activations (midpoints alpha = (i + 1/2) / steps), with every cell column of the site moved along it
        together (integrated gradients per site): a_alpha = a_base + alpha (a_source - a_base)."""
        cells = [c for c in self.cells if c.site == site and c.kind != "pattern"]
        rows = torch.arange(2 * pairs.n_pairs, device=pairs.inputs["input_ids"].device)
        moves = []  # (cols, heads, base, source) per cell
        for cell in cells:
            base_cols, src_cols, _ = pairs.columns(cell.position)
            heads = None if cell.head is None else torch.full_like(base_cols, int(cell.head))
            moves.append((base_cols, heads, self._gather(run.acts[site], rows, base_cols, cell.head),
                          self._gather(pairs.source_acts[site], pairs.pair_of_row, src_cols, cell.head)))
        total = torch.zeros_like(run.grads[site])
        for i in range(steps):
            alpha = (i + 0.5) / steps
            patches = [(rows[:, None], cols, heads, base + alpha * (source - base)) for cols, heads, base, source in moves]
            store: dict[Site, torch.Tensor] = {}
            actions = {site: _SiteAction(keep=True, leaf=True, patches=patches)}
            with frozen_parameters(self.pipeline.model), torch.enable_grad(), self._hooked(actions, store):
                logprobs, _ = self.row_scores(pairs.inputs, pairs.lengths)
                (logprobs * pairs.signs).sum().backward()
            total += _flat(store[site].grad)
        return total / steps

    def _gather(self, t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, head: int | None) -> torch.Tensor:
        """(R, n, d) values of ``t`` (B, T, d) at rows × cols; head sites: one head's (R, n, d_head) slice."""
        if head is None:
            return t[rows[:, None], cols]
        return t.reshape(*t.shape[:2], self.n_heads, self.d_head)[rows[:, None], cols, head]

    def _cell_estimates(self, pairs: PreparedPairs, run: _Pass, cell: AttributionCell
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N,) AtP* and (N,) linearised estimates of one cell, both rows of every pair summed, and (N,) the AtP*
        term of the cf rows alone (the estimated change of log p(cf label))."""
        base_cols, src_cols, mask = pairs.columns(cell.position)
        rows = torch.arange(2 * pairs.n_pairs, device=base_cols.device)
        n = pairs.n_pairs
        grad = self._gather(run.grads[cell.site], rows, base_cols, cell.head).float()
        if cell.kind != "pattern":
            base = self._gather(run.acts[cell.site], rows, base_cols, cell.head).float()
            source = self._gather(pairs.source_acts[cell.site], pairs.pair_of_row, src_cols, cell.head).float()
            per_row = (((source - base) * grad).sum(-1) * mask).sum(-1)
            return per_row[:n] + per_row[n:], per_row[:n] + per_row[n:], per_row[:n]
        values = run.values[cell.layer][:, int(cell.head) // self.groups].float()  # (2N, T, d_head)
        d_probs = grad @ values.transpose(1, 2)  # (2N, n, T): dM/dA at the query columns
        probs = run.probs[cell.layer][:, int(cell.head)].float()[rows[:, None], base_cols]  # (2N, n, T)
        new = pairs.transplanted(cell.layer, int(cell.head), cell.position).float()
        star = (((new - probs) * d_probs).sum(-1) * mask).sum(-1)
        d_logits = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
        both = (probs > 0) & (new > 0)
        moved = torch.where(both, torch.log(new.clamp(min=1e-30)) - torch.log(probs.clamp(min=1e-30)),
                            torch.zeros_like(new))
        linear = ((d_logits * moved).sum(-1) * mask).sum(-1)
        return star[:n] + star[n:], linear[:n] + linear[n:], star[:n]

    def estimate_prepared(self, pairs: PreparedPairs, graddrop: bool = False, progress: bool = False,
                          path_steps: int = 0) -> AttributionResult:
        """Estimates of every cell on prepared pairs (see the module docstring); ``path_steps`` > 0: the activation
        cells' gradients are averaged along the path to the source (`_path_gradient`, one forward and backward per
        step and site)."""
        if not self.cells:
            raise ValueError("no cells to estimate")
        if path_steps < 0:
            raise ValueError(f"path_steps must be >= 0, got {path_steps}")
        run = self._gradient_pass(pairs)
        path = None  # the activation cells' pass when their gradients are path averages (pattern cells keep ``run``)
        if path_steps:
            sites = [s for s in self._sites(self.cells) if any(c.site == s and c.kind != "pattern" for c in self.cells)]
            grads = dict(run.grads)
            for site in tqdm(sites, desc="path gradients", disable=not progress, leave=False):
                grads[site] = self._path_gradient(pairs, run, site, path_steps)
            path = replace(run, grads=grads)
        n = pairs.n_pairs
        logp = run.logprobs.cpu().numpy().astype(float)
        greedy = run.greedy.cpu().numpy().astype(bool)
        metric = logp[:n] - logp[n:]

        def all_cells(r: _Pass, activations: _Pass | None = None) -> tuple[np.ndarray, ...]:
            parts = [self._cell_estimates(pairs, r if activations is None or cell.kind == "pattern" else activations,
                                          cell) for cell in self.cells]
            return tuple(torch.stack([p[j] for p in parts]).cpu().numpy() for j in range(3))

        estimates, linearised, toward = all_cells(run, path)
        dropped = None
        if graddrop:  # of the plain estimate (AtP*): every dropped pass takes plain gradients
            plain = estimates if path is None else all_cells(run)[0]
            first = self._sites(self.cells)[0]
            per_layer = []
            for layer in tqdm(range(self.n_layers), desc="GradDrop layers", disable=not progress, leave=False):
                below = max(_ORDER["attention_output"], _ORDER["mlp_output"]) < _ORDER[first.component]
                if layer < first.layer or (layer == first.layer and below):
                    per_layer.append(plain)  # the dropped outputs lie below the gradient's leaf: nothing changes
                else:
                    per_layer.append(all_cells(self._gradient_pass(pairs, drop_layer=layer))[0])
            dropped = np.stack(per_layer)
            dropped[:, :, ~pairs.informative] = 0.0
        for array in (estimates, linearised, toward):
            array[:, ~pairs.informative] = 0.0
        return AttributionResult([c.cell_id for c in self.cells], estimates, metric, pairs.informative,
                                 linearised=linearised, graddrop=dropped, toward=toward, logp_cf=logp[:n],
                                 logp_base=logp[n:], greedy_cf=greedy[:n], greedy_base=greedy[n:])

    def estimate(self, bases: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]],
                 base_labels: Sequence[Any], cf_labels: Sequence[Any], exact: bool = False, graddrop: bool = False,
                 progress: bool = False, path_steps: int = 0) -> AttributionResult:
        """Estimates (and, with ``exact``, exact effects) of every cell on the pairs (base i, source i)."""
        pairs = self.prepare(bases, sources, base_labels, cf_labels)
        result = self.estimate_prepared(pairs, graddrop=graddrop, progress=progress, path_steps=path_steps)
        if exact:
            rows = self.exact_rows(pairs, progress=progress)
            result.exact = self.effects(pairs, rows, result.metric_base)
            result.exact_toward = self.effects(pairs, rows, result.logp_cf, toward=True)
        return result

    # ------------------------------------------------------------------ exact effects
    @torch.no_grad()
    def base_metric(self, pairs: PreparedPairs) -> np.ndarray:
        """(N,) the unpatched metric of prepared pairs (one forward, no gradient)."""
        logprobs = self.row_logprobs(pairs.inputs, pairs.lengths)
        return (logprobs[: pairs.n_pairs] - logprobs[pairs.n_pairs :]).cpu().numpy()

    def exact(self, bases: Sequence[dict[str, Any]], sources: Sequence[dict[str, Any]], base_labels: Sequence[Any],
              cf_labels: Sequence[Any], estimated: AttributionResult, cells: Sequence[AttributionCell] | None = None,
              progress: bool = False) -> np.ndarray:
        """(C, N) exact effects of ``cells`` (default: all) on the pairs of an earlier `estimate` (its base metric
        reused)."""
        pairs = self.prepare(bases, sources, base_labels, cf_labels)
        return self.exact_prepared(pairs, estimated.metric_base, cells, progress)

    @torch.no_grad()
    def exact_prepared(self, pairs: PreparedPairs, metric_base: np.ndarray,
                       cells: Sequence[AttributionCell] | None = None, progress: bool = False) -> np.ndarray:
        """(C, N) ``M(patched) - metric_base`` per cell and pair: cells × 2N rows per forward, activation cells and
        pattern cells in separate forwards."""
        return self.effects(pairs, self.exact_rows(pairs, cells, progress), metric_base)

    @staticmethod
    def effects(pairs: PreparedPairs, rows: np.ndarray, unpatched: np.ndarray, toward: bool = False) -> np.ndarray:
        """(C, N) exact effects from `exact_rows`' log-probabilities: ``M(patched) - unpatched`` (the metric), or
        with ``toward`` ``log p(cf label | patched) - unpatched`` (its cf part); 0 on pairs whose labels agree."""
        patched = rows[:, 0] if toward else rows[:, 0] - rows[:, 1]
        out = patched - np.asarray(unpatched)[None]
        out[:, ~pairs.informative] = 0.0
        return out

    @torch.no_grad()
    def exact_rows(self, pairs: PreparedPairs, cells: Sequence[AttributionCell] | None = None,
                   progress: bool = False) -> np.ndarray:
        """(C, 2, N) log p(cf label) (``[:, 0]``) and log p(base label) (``[:, 1]``) of the base prompts with each
        cell patched: cells × 2N rows per forward, activation cells and pattern cells in separate forwards."""
        cells = list(self.cells if cells is None else cells)
        n = pairs.n_pairs
        per_forward = max(1, self.max_rows_per_forward // (2 * n))
        chunks = []
        for pattern in (False, True):
            group = [k for k, c in enumerate(cells) if (c.kind == "pattern") == pattern]
            chunks += [group[i : i + per_forward] for i in range(0, len(group), per_forward)]
        out = np.zeros((len(cells), 2, n))
        for chunk in tqdm(chunks, desc="exact patching", disable=not progress, leave=False):
            out[chunk] = self._patched_rows(pairs, [cells[k] for k in chunk])
        return out

    def _patched_rows(self, pairs: PreparedPairs, cells: list[AttributionCell]) -> np.ndarray:
        """(len(cells), 2, N) log-probabilities of the rows with each cell patched (rows cell-major, 2N per
        cell)."""
        n2 = 2 * pairs.n_pairs
        inputs = {k: v.repeat(len(cells), 1) for k, v in pairs.inputs.items()}
        actions: dict[Site, _SiteAction] = {}
        ops: list[Any] = []
        rows = torch.arange(n2, device=pairs.inputs["input_ids"].device)
        for k, cell in enumerate(cells):
            base_cols, src_cols, mask = pairs.columns(cell.position)
            if cell.kind == "pattern":
                query = torch.where(mask, base_cols, torch.full_like(base_cols, -1))
                probs = pairs.transplanted(cell.layer, int(cell.head), cell.position)
                ops.append(TransplantAttention(cell.layer, [int(cell.head)], rows + k * n2, query, probs[:, None],
                                               coordinates="cache"))
                continue
            values = self._gather(pairs.source_acts[cell.site], pairs.pair_of_row, src_cols, cell.head)
            r = (rows[:, None] + k * n2).expand_as(base_cols)[mask]
            heads = torch.full_like(r, int(cell.head)) if cell.head is not None else None
            actions.setdefault(cell.site, _SiteAction()).patches.append((r, base_cols[mask], heads, values[mask]))
        with self._hooked(actions, {}, ops):
            logprobs = self.row_logprobs(inputs, pairs.lengths * len(cells)).view(len(cells), 2, pairs.n_pairs)
        return logprobs.cpu().numpy().astype(float)
