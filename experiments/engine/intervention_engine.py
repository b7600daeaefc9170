"""The one intervention loop every experiment runs through, on either backend (hooks or pyvene).

For one *part* (a fixed batch of B base/counterfactual pairs) the engine:
1. tokenises bases and counterfactuals once (left padded) and generates the base outputs;
2. collects every needed source activation in ONE forward of the counterfactuals;
3. for each cell group (cells of the same kind sharing the same sites, e.g. one layer × many
   positions), folds cells × pairs into the batch (row = cell-major), builds one
   ``experiments.backends.sites.SitePatch`` per site (columns and new values per row), runs the backend's
   intervened prompt pass and decodes greedily from its KV cache (the intervention touches the
   prompt only).
Speed work (suffix-only recomputation, cached base prefixes …) belongs here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from typing import Any, Callable, Sequence

import torch

from causal.results import CellSpec
from experiments.backends.architectures import site_width
from experiments.backends import DEFAULT_BACKEND, Backend, make_backend
from experiments.backends.attention_control import (
    BlockAttention,
    RecordAttention,
    ScaleQK,
    TransplantAttention,
    align_source_probs,
)
from experiments.engine.model_units import ATTENTION_PATTERN, ModelUnit
from experiments.pipeline import GenerationOutput, LMPipeline, PromptBatch
from experiments.backends.sites import Site, SitePatch
from experiments.backends.suffix_reuse import (IN_LAYER_COMPONENTS, RESIDUAL_COMPONENTS, BaseRun, ResidualPatch,
                                                SuffixReuse, resume_index)
from experiments.token_positions import TokenPositionError

#: Intervention kinds on activations. ``interchange``: the value of the counterfactual run;
#: ``zero_ablation``: zeros; ``mean_ablation``: ``Cell.ablation_values`` (a mean over a reference dataset).
SITE_KINDS = ("interchange", "zero_ablation", "mean_ablation")
#: Attention-level kinds (units are ``AttentionPattern``s; see ``experiments.backends.attention_control``):
#: ``attention_block``: keys at the unit's position get zero probability from every later query, in the
#: prompt pass and every decoding step; ``attention_transplant``: the probabilities of the unit's query
#: positions come from the counterfactual run, keys aligned by unpadded index or by ``key_roles``
#: (unmatched keys get 0, rows renormalised); ``qk_scale``: ``parameters = {"target": "query"|"key",
#: "factor": float}`` at the unit's positions (``"all_positions": True``: every position). Each kind acts on
#: the unit's head, or on every head of the layer when the unit names none.
ATTENTION_KINDS = ("attention_block", "attention_transplant", "qk_scale")
KINDS = SITE_KINDS + ATTENTION_KINDS
#: Kinds that read the counterfactual run (the others act on the base run alone).
SOURCE_KINDS = ("interchange", "attention_transplant")


@dataclass
class Cell:
    """An intervention site: units acted on together, with one intervention ``kind``.

    ``ablation_values[i]`` (mean ablation): the (d,) value written at unit i's positions.
    ``key_roles`` (attention transplant): token positions whose tokens correspond between base and
    counterfactual prompts (keys are aligned role by role; without roles, by unpadded index).
    ``parameters``: JSON-able settings recorded in the results manifest (e.g. a hash of the means).
    """

    cell_id: str
    units: list[ModelUnit]
    kind: str = "interchange"
    parameters: dict[str, Any] = field(default_factory=dict)
    ablation_values: list[torch.Tensor] | None = None
    key_roles: list[Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown intervention kind {self.kind!r}; known: {', '.join(KINDS)}")
        attention = [u.component == ATTENTION_PATTERN for u in self.units]
        if self.units and any(attention) != (self.kind in ATTENTION_KINDS) or len(set(attention)) > 1:
            raise ValueError(f"cell {self.cell_id!r}: kind {self.kind!r} needs "
                             f"{'attention_pattern' if self.kind in ATTENTION_KINDS else 'activation'} units only")
        if self.kind == "qk_scale" and (self.parameters.get("target") not in ("query", "key")
                                        or not isinstance(self.parameters.get("factor"), (int, float))):
            raise ValueError(f"cell {self.cell_id!r}: qk_scale needs parameters target ('query'|'key') and factor")
        if self.key_roles:
            self.parameters = {**self.parameters, "key_roles": [p.id for p in self.key_roles]}
        if self.kind == "mean_ablation" and (self.ablation_values is None or len(self.ablation_values) != len(self.units)):
            raise ValueError(f"cell {self.cell_id!r}: mean ablation needs one ablation value per unit")

    @property
    def signature(self) -> tuple:
        """Cells with equal signatures share forwards: same kind, sites, featurizers and feature choice."""
        if self.kind in ATTENTION_KINDS:
            return (self.kind, repr(sorted(self.parameters.items())),
                    *((u.layer, u.head) for u in self.units))
        return (self.kind, *((u.site, u.address.featurizer_id, u.address.featurizer_sha256, u.feature_indices)
                             for u in self.units))

    @property
    def spec(self) -> CellSpec:
        featurizer = self.units[0].address.featurizer_id if self.units else "identity"
        return CellSpec(cell_id=self.cell_id, units=[u.address for u in self.units], featurizer_id=featurizer,
                        kind=self.kind, parameters=self.parameters)


def group_cells(cells: Sequence[Cell], cells_per_forward: int) -> list[list[Cell]]:
    """Cells with equal signatures, in first-seen order, chunked to at most ``cells_per_forward``."""
    by_signature: dict[tuple, list[Cell]] = {}
    for cell in cells:
        by_signature.setdefault(cell.signature, []).append(cell)
    groups = []
    for members in by_signature.values():
        for start in range(0, len(members), cells_per_forward):
            groups.append(members[start : start + cells_per_forward])
    return groups


def _pad_to(indices: list[int], width: int) -> list[int]:
    """Repeat the last index (with its own source value): patching a position twice with the same
    value is a no-op. Base and source lists of one pair always have equal length (checked)."""
    return indices + [indices[-1]] * (width - len(indices))


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` and RuntimeErrors saying "out of memory" (CPU, MPS, older CUDA)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(exc, oom_type)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _halves(groups: list[list[Cell]]) -> list[list[list[Cell]]]:
    """Split a list of groups in two halves of cells (a single group is split into two groups of its cells)."""
    if len(groups) > 1:
        middle = len(groups) // 2
        return [groups[:middle], groups[middle:]]
    (group,) = groups
    middle = len(group) // 2
    return [[group[:middle]], [group[middle:]]]


def slice_generation(generation: GenerationOutput, start: int, stop: int) -> GenerationOutput:
    """Rows ``start:stop`` of a generation."""
    return GenerationOutput(generation.token_ids[start:stop], generation.lengths[start:stop],
                            generation.topk_token_ids[start:stop], generation.topk_logits[start:stop])


def _feature_mask(unit: ModelUnit, width: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask over the featurizer's features selecting ``unit.feature_indices`` (None = all)."""
    if unit.feature_indices is None:
        return None
    features, _ = unit.featurizer.featurize(torch.zeros(1, width, device=device))
    k = features.shape[-1]
    indices = list(unit.feature_indices)
    if any(not 0 <= i < k for i in indices) or len(set(indices)) != len(indices):
        raise ValueError(f"feature indices {unit.feature_indices} must be distinct and in 0..{k - 1} "
                         f"(featurizer {unit.address.featurizer_id!r} has {k} features)")
    mask = torch.zeros(k, dtype=torch.bool, device=device)
    mask[indices] = True
    return mask


@dataclass
class Part:
    """One part of a dataset as the engine runs it: the left-padded base and counterfactual batches, the
    examples' indices, the counterfactual run's activations per site (and, under ``("probs", layer)``, its
    attention probabilities), and each token position's padded columns on the base and source side
    (keyed by ``id(position)``, one list per pair)."""

    base_batch: PromptBatch
    cf_batch: PromptBatch
    example_indices: list[int]
    sources: dict[Any, torch.Tensor]
    base_cols: dict[int, list[list[int]]]
    source_cols: dict[int, list[list[int]]]

    @property
    def n_pairs(self) -> int:
        return len(self.example_indices)

    def rows_of(self, groups: list[list[Cell]]) -> PromptBatch:
        """The base batch repeated for each group's cells × pairs (cell-major), groups in order."""
        return self.base_batch.select([b for group in groups for _ in group for b in range(self.n_pairs)])


def _check_joint(unit: ModelUnit, n: int, indices: list[list[int]]) -> None:
    """A joint featurizer (n·d wide) needs exactly n distinct tokens at its unit in every prompt."""
    for ix in indices:
        if len(ix) != n or len(set(ix)) != n:
            raise ValueError(f"unit {unit.id}: its featurizer {unit.address.featurizer_id!r} acts on {n} tokens "
                             f"jointly, but position {unit.position.id!r} gives {len(ix)} token(s) in some prompt")


class InterventionEngine:
    """Runs cells over parts of a dataset on one pipeline through one backend ("hooks" or "pyvene").

    ``suffix_reuse`` (hooks backend): single-unit site cells (residual stream, attention and MLP outputs,
    heads, neurons) take the exact fast path of ``experiments.backends.suffix_reuse`` where the model supports
    it (else the generic path);
    ``max_rows_per_forward``: the row budget: at most this many cells × pairs per forward (groups are split
    to fit; residual-stream groups are merged up to it for the fast path); halved on out-of-memory.
    """

    def __init__(self, pipeline: LMPipeline, backend: str | Backend = DEFAULT_BACKEND, suffix_reuse: bool = True,
                 max_rows_per_forward: int = 512, pack_sites: bool = False):
        self.pipeline = pipeline
        self.backend: Backend = make_backend(backend, pipeline.model) if isinstance(backend, str) else backend
        self.suffix_reuse = suffix_reuse
        self.max_rows_per_forward = max_rows_per_forward
        self.suffix = SuffixReuse(pipeline) if suffix_reuse and "suffix_reuse" in self.backend.operations else None
        if pack_sites and "row_patches" not in self.backend.operations:
            raise ValueError(f"pack_sites needs a backend with row patches; {type(self.backend).__name__} has none")
        self.pack_sites = pack_sites

    @torch.no_grad()
    def run_part(
        self,
        bases: list[dict[str, Any]],
        counterfactuals: list[dict[str, Any]],
        example_indices: list[int],
        groups: list[list[Cell]],
        batches: list[list[list[Cell]]] | None = None,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Base rows and intervened rows (raw-results schema) for one part of B pairs: every cell of ``groups``,
        run as ``batches`` (default ``plan(groups, B)``; a sublist of the plan runs a cell range of it)."""
        if "attention" not in self.backend.operations and any(g[0].kind in ATTENTION_KINDS for g in groups):
            raise ValueError(f"backend {type(self.backend).__name__} has no attention operation for attention cells")
        pipeline = self.pipeline
        base_batch = pipeline.load(bases)
        cf_batch = pipeline.load(counterfactuals)
        base_run: BaseRun | None = None
        # the base rows' route depends on the part only (never on which cells run): cell ranges of a part
        # run in different processes write byte-identical base rows
        if self.suffix is not None and self.suffix.supports(base_batch.input_ids.shape[1]) is None:
            def base_forward(inputs: dict[str, Any]) -> Any:  # the suffix base pass is the base rows' prompt pass
                nonlocal base_run
                base_run = self.suffix.base_pass(base_batch)
                return base_run.output

            base_generation = pipeline.greedy_decode(base_batch, base_forward)
        else:
            base_generation = pipeline.generate(base_batch)
        base_rows = pipeline.output_rows(base_generation, example_indices)

        sites = sorted({unit.site for group in groups for cell in group if cell.kind == "interchange"
                        for unit in cell.units}, key=lambda s: (s.layer, s.component))
        sources: dict[Any, Any] = self.backend.collect(sites, cf_batch.model_inputs()) if sites else {}
        transplant_layers = sorted({u.layer for group in groups for cell in group
                                    if cell.kind == "attention_transplant" for u in cell.units})
        if transplant_layers:  # the counterfactual run's attention probabilities, (B, H, T, T) per layer
            with self.backend.attention([RecordAttention(transplant_layers)]) as control:
                pipeline.model.base_model(**cf_batch.model_inputs(), use_cache=False)
            sources.update({("probs", layer): control.get(layer).probs for layer in transplant_layers})

        # token indices of each (position, example), padded-batch coordinates, computed once per part;
        # source-side indices only for positions a cell reads from the counterfactual (interchange, transplant)
        base_cols: dict[int, list[list[int]]] = {}
        source_cols: dict[int, list[list[int]]] = {}
        for group in groups:
            for cell in group:
                needs_source = cell.kind in SOURCE_KINDS
                for pos in [u.position for u in cell.units] + list(cell.key_roles or []):
                    if id(pos) not in base_cols:
                        base_cols[id(pos)] = [[i + base_batch.pad_offsets[b] for i in pos.index(base)]
                                              for b, base in enumerate(bases)]
                    if not needs_source or id(pos) in source_cols:
                        continue
                    source_cols[id(pos)] = []
                    for b, (base, cf) in enumerate(zip(bases, counterfactuals)):
                        on_source = pos.counterfactual_index(cf)
                        if len(base_cols[id(pos)][b]) != len(on_source):
                            raise TokenPositionError(
                                f"token position {pos.id!r} selects {len(base_cols[id(pos)][b])} token(s) in the base "
                                f"{base.get('raw_input')!r} but {len(on_source)} in the counterfactual "
                                f"{cf.get('raw_input')!r}; an interchange needs equally many on both sides"
                            )
                        source_cols[id(pos)].append([i + cf_batch.pad_offsets[b] for i in on_source])

        part = Part(base_batch, cf_batch, example_indices, sources, base_cols, source_cols)
        cell_rows: list[dict[str, Any]] = []
        n_pairs = part.n_pairs
        order = {cell.cell_id: k for k, cell in enumerate(c for group in groups for c in group)}

        def run_slow(gs: list[list[Cell]]) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for group in gs:
                if group[0].kind in ATTENTION_KINDS:
                    out.extend(self._run_attention_group(group, part))
                else:
                    out.extend(self._run_packed([group], part))
            return out

        for batch in (self.plan(groups, n_pairs) if batches is None else batches):
            if base_run is not None and self._suffix_eligible(batch[0]):
                run_fast = lambda gs: self._run_suffix_groups(gs, base_run, part)  # noqa: E731
                cell_rows.extend(self._within_budget(run_fast, batch, n_pairs))
            elif self.pack_sites and batch[0][0].kind in SITE_KINDS:
                # the packable groups, and suffix-eligible ones in a part the fast path does not apply to
                cell_rows.extend(self._within_budget(lambda gs: self._run_packed(gs, part), batch, n_pairs))
            else:
                for group in batch:
                    cell_rows.extend(self._within_budget(run_slow, [group], n_pairs))
        cell_rows.sort(key=lambda row: order[row["cell_id"]])  # stable: the groups' order, pairs within a cell
        return base_rows, cell_rows

    def plan(self, groups: list[list[Cell]], n_pairs: int, max_rows: int | None = None) -> list[list[list[Cell]]]:
        """The forward batches of a part of ``n_pairs`` pairs, in execution order: groups eligible for suffix
        reuse packed greedily (in order) up to ``max_rows`` rows (default: the current row budget, which an
        out-of-memory retry lowers); then, with ``pack_sites``, the other activation-site groups packed the same
        way (cells of different sites in one forward, each patch on its own rows); then every other group alone.

        A batch runs the same way whatever else the part runs, so splitting a part's batches between
        processes (cell-range shards, planned with the configured budget) gives the same numbers as
        running them together."""
        max_rows = self.max_rows_per_forward if max_rows is None else max_rows

        def packed(members: list[list[Cell]]) -> list[list[list[Cell]]]:
            batches: list[list[list[Cell]]] = []
            pending: list[list[Cell]] = []
            for group in members:
                if pending and (sum(len(g) for g in pending) + len(group)) * n_pairs > max_rows:
                    batches.append(pending)
                    pending = []
                pending.append(group)
            return batches + ([pending] if pending else [])

        fast = [g for g in groups if self._suffix_eligible(g)]
        sites = [g for g in groups if not self._suffix_eligible(g) and self._packable(g)]
        alone = [[g] for g in groups if not self._suffix_eligible(g) and not self._packable(g)]
        return packed(fast) + packed(sites) + alone

    def _packable(self, group: list[Cell]) -> bool:
        """An activation-site group (not on the suffix path) that ``pack_sites`` may share a forward with others."""
        return self.pack_sites and group[0].kind in SITE_KINDS and not self._suffix_eligible(group)

    def _within_budget(self, run: Callable[[list[list[Cell]]], list[dict[str, Any]]], groups: list[list[Cell]],
                       n_pairs: int) -> list[dict[str, Any]]:
        """``run(groups)`` with at most ``max_rows_per_forward`` cells × pairs per call; on out-of-memory the
        budget is halved (kept for later calls) and the failed call is redone in halves — finished calls keep
        their rows. Raises when a single cell's rows do not fit."""
        cells = sum(len(g) for g in groups)
        if cells > 1 and cells * n_pairs > self.max_rows_per_forward:
            return [row for half in _halves(groups) for row in self._within_budget(run, half, n_pairs)]
        try:
            return run(groups)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(exc) or cells == 1:
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.max_rows_per_forward = max(n_pairs, (cells * n_pairs) // 2)
        warnings.warn(f"out of memory with {cells * n_pairs} rows per forward; retrying with at most "
                      f"{self.max_rows_per_forward}", RuntimeWarning, stacklevel=2)
        return [row for half in _halves(groups) for row in self._within_budget(run, half, n_pairs)]

    def _site_width(self, site: Site, sources: dict[Site, torch.Tensor]) -> int:
        return sources[site].shape[-1] if site in sources else site_width(self.pipeline.model, site.component)

    def _site_patches(self, group: list[Cell], part: Part) -> list[SitePatch]:
        """One ``SitePatch`` per unit slot for rows = cells × pairs (cell-major)."""
        sources, base_cols, source_cols, n_pairs = part.sources, part.base_cols, part.source_cols, part.n_pairs
        pipeline = self.pipeline
        kind = group[0].kind
        device = pipeline.device
        pair_index = torch.arange(n_pairs, device=device).repeat(len(group))

        patches: list[SitePatch] = []
        for slot, first in enumerate(group[0].units):
            site = first.site
            units = [cell.units[slot] for cell in group]
            base_idx = [base_cols[id(u.position)][b] for u in units for b in range(n_pairs)]
            src_idx = ([source_cols[id(u.position)][b] for u in units for b in range(n_pairs)]
                       if kind == "interchange" else [])
            width = max(len(ix) for ix in base_idx + src_idx)
            columns = torch.tensor([_pad_to(ix, width) for ix in base_idx], device=device)  # (R, n)
            heads = (torch.tensor([u.head for u in units for _ in range(n_pairs)], device=device)
                     if site.per_head else None)
            if kind == "interchange":
                src = torch.tensor([_pad_to(ix, width) for ix in src_idx], device=device)  # (R, n)
                full = sources[site]  # (B, T, d) or (B, T, H, d_head)
                rows_ix = pair_index[:, None].expand_as(src)
                values = full[rows_ix, src, heads[:, None].expand_as(src)] if site.per_head else full[rows_ix, src]
            else:
                d = self._site_width(site, sources)
                dtype = next(pipeline.model.parameters()).dtype
                if kind == "zero_ablation":
                    values = torch.zeros(columns.shape[0], width, d, device=device, dtype=dtype)
                else:  # mean_ablation
                    for cell in group:
                        if tuple(cell.ablation_values[slot].shape) != (d,):
                            raise ValueError(f"cell {cell.cell_id!r}: mean-ablation value of unit {slot} has shape "
                                             f"{tuple(cell.ablation_values[slot].shape)}, the site is ({d},) wide")
                    per_cell = torch.stack([cell.ablation_values[slot].to(device, dtype) for cell in group])  # (C, d)
                    values = per_cell.repeat_interleave(n_pairs, dim=0)[:, None, :].expand(-1, width, -1)
            featurizer = first.featurizer if first.featurized else None
            joint_width = getattr(featurizer, "input_width", None)
            if joint_width is not None and joint_width != values.shape[-1]:
                _check_joint(first, joint_width // values.shape[-1], base_idx + src_idx)
            mask = (_feature_mask(first, joint_width or values.shape[-1], device) if featurizer is not None
                    else None)
            patches.append(SitePatch(site, columns, values, heads, featurizer, mask))
        return patches

    def _run_packed(self, groups: list[list[Cell]], part: Part) -> list[dict[str, Any]]:
        """Activation-site groups in one prompt pass: rows = each group's cells × pairs, in order. A single group
        patches every row; with several, each group's patches write its own rows only (`SitePatch.rows`)."""
        patches: list[SitePatch] = []
        offset = 0
        for group in groups:
            n = len(group) * part.n_pairs
            for patch in self._site_patches(group, part):
                if len(groups) > 1:
                    patch.rows = torch.arange(offset, offset + n, device=self.pipeline.device)
                patches.append(patch)
            offset += n
        generation = self.pipeline.greedy_decode(part.rows_of(groups),
                                                 lambda inputs: self.backend.prompt_pass(inputs, patches))
        return self._group_rows(generation, groups, part.example_indices)

    def _group_rows(self, generation: GenerationOutput, groups: list[list[Cell]], example_indices: list[int]
                    ) -> list[dict[str, Any]]:
        """The output rows of a generation whose rows are each group's cells × pairs, groups in order."""
        out: list[dict[str, Any]] = []
        offset = 0
        for group in groups:
            n = len(group) * len(example_indices)
            out.extend(self._rows(slice_generation(generation, offset, offset + n), group, example_indices))
            offset += n
        return out

    def _suffix_eligible(self, group: list[Cell]) -> bool:
        """Site cells of one unit each, in the residual stream or inside a layer (attention or MLP output, heads,
        neurons), on a backend declaring suffix reuse: the fast path applies."""
        return (self.suffix is not None and group[0].kind in SITE_KINDS
                and all(len(cell.units) == 1
                        and cell.units[0].site.component in RESIDUAL_COMPONENTS + IN_LAYER_COMPONENTS
                        for cell in group))

    def _run_suffix_groups(self, groups: list[list[Cell]], base_run: BaseRun, part: Part) -> list[dict[str, Any]]:
        """Several site groups in one suffix-reuse prompt pass (rows = groups' cells × pairs). A group inside a layer
        first becomes the equal residual patch at that layer's output (`SuffixReuse.layer_outputs`)."""
        n_pairs = part.n_pairs
        device = self.pipeline.device
        parts = []
        for group in groups:
            (patch,) = self._site_patches(group, part)
            pairs = torch.arange(n_pairs, device=device).repeat(len(group))
            r = resume_index(patch.site)
            if patch.site.component in IN_LAYER_COMPONENTS:
                values = self.suffix.layer_outputs(base_run, patch, pairs)
            else:
                values = patch.new_values(base_run.residual[r][pairs[:, None].expand_as(patch.columns), patch.columns])
            parts.append(ResidualPatch(pairs, torch.full_like(pairs, r), patch.columns, values))
        rows_patch = ResidualPatch.concat(parts)
        rows = base_run.batch.select(rows_patch.pairs)
        generation = self.pipeline.greedy_decode(
            rows, lambda inputs: self.suffix.prompt_pass(base_run, rows_patch, want_cache=bool(inputs["use_cache"])))
        return self._group_rows(generation, groups, part.example_indices)

    def _rows(self, generation: Any, group: list[Cell], example_indices: list[int]) -> list[dict[str, Any]]:
        n_pairs = len(example_indices)
        out_rows = self.pipeline.output_rows(generation, [example_indices[b] for _ in group for b in range(n_pairs)])
        for r, row in enumerate(out_rows):
            row["cell_id"] = group[r // n_pairs].cell_id
        return out_rows

    def _key_map(self, cell: Cell, part: Part, b: int) -> list[int]:
        """For base row b: the source column each base column's key reads (-1 = unmatched)."""
        base_batch, cf_batch, base_cols, source_cols = part.base_batch, part.cf_batch, part.base_cols, part.source_cols
        width = base_batch.input_ids.shape[1]
        mapping = [-1] * width
        if cell.key_roles:
            for role in cell.key_roles:
                for bc, sc in zip(base_cols[id(role)][b], source_cols[id(role)][b]):
                    mapping[bc] = sc
            return mapping
        pad_b, pad_s, n_s = base_batch.pad_offsets[b], cf_batch.pad_offsets[b], cf_batch.lengths[b]
        for j in range(pad_b, width):
            if j - pad_b < n_s:
                mapping[j] = j - pad_b + pad_s
        return mapping

    def _run_attention_group(self, group: list[Cell], part: Part) -> list[dict[str, Any]]:
        """Attention-level cells: build the ops for cells × pairs rows, decode under the backend's attention
        operation."""
        pipeline = self.pipeline
        sources, base_cols, source_cols, n_pairs = part.sources, part.base_cols, part.source_cols, part.n_pairs
        kind = group[0].kind
        rows = part.rows_of([group])
        device = pipeline.device
        n_rows = len(group) * n_pairs
        pair_of_row = [b for _ in group for b in range(n_pairs)]
        ops: list[Any] = []
        for slot, first in enumerate(group[0].units):
            units = [cell.units[slot] for cell in group]
            base_idx = [base_cols[id(u.position)][b] for u in units for b in range(n_pairs)]
            width = max(len(ix) for ix in base_idx)
            columns = torch.tensor([ix + [-1] * (width - len(ix)) for ix in base_idx], device=device)
            heads = None if first.head is None else [first.head]
            if kind == "attention_block":
                ops.append(BlockAttention(columns, layers=[first.layer], heads=heads, coordinates="cache"))
            elif kind == "qk_scale":
                params = group[0].parameters
                positions = None if params.get("all_positions") else columns
                ops.append(ScaleQK(first.layer, heads, params["target"], params["factor"], positions=positions,
                                   coordinates="cache"))
            else:  # attention_transplant
                src_idx = [source_cols[id(u.position)][b] for u in units for b in range(n_pairs)]
                probs = sources[("probs", first.layer)]  # (B, H, Ts, Ts)
                head_list = list(range(probs.shape[1])) if first.head is None else [first.head]
                src = torch.tensor([ix + [ix[-1]] * (width - len(ix)) for ix in src_idx], device=device)
                pair = torch.tensor(pair_of_row, device=device)
                picked = probs[pair][:, head_list]  # (R, h, Ts, Ts)
                picked = picked.gather(2, src[:, None, :, None].expand(-1, len(head_list), -1, picked.shape[-1]))
                key_map = torch.tensor(
                    [self._key_map(group[r // n_pairs], part, pair_of_row[r]) for r in range(n_rows)], device=device)
                aligned = align_source_probs(picked, key_map)
                # a query never reads a key after itself: drop such keys, renormalise what is left
                keys = torch.arange(aligned.shape[-1], device=device)
                causal = (keys[None, None, :] <= columns[:, :, None]).to(aligned.dtype)[:, None]  # (R, 1, n, Kb)
                aligned = aligned * causal
                total = aligned.sum(-1, keepdim=True)
                aligned = torch.where(total > 0, aligned / total.clamp(min=torch.finfo(aligned.dtype).tiny), aligned)
                ops.append(TransplantAttention(first.layer, head_list, torch.arange(n_rows, device=device),
                                               columns, aligned.to(probs.dtype), coordinates="cache"))
        with self.backend.attention(ops):
            generation = pipeline.greedy_decode(rows, lambda inputs: pipeline.body(**inputs))
        return self._rows(generation, group, part.example_indices)
