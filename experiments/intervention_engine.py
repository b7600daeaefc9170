"""The one intervention loop every experiment runs through (pyvene underneath).

For one *part* (a fixed batch of B base/counterfactual pairs) the engine:
1. tokenises bases and counterfactuals once (left padded) and generates the base outputs;
2. collects every needed source activation in ONE forward of the counterfactuals;
3. for each cell group (cells sharing the same pyvene sites, e.g. one layer × many positions),
   folds cells × pairs into the batch (row = cell-major), hands pyvene the precomputed source
   representations and per-row positions, runs the intervened prompt pass and decodes greedily
   from its KV cache (so the intervention touches the prompt only).
Speed work (suffix-only recomputation, cached base prefixes …) belongs here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from causal.raw_results import CellSpec
from experiments.model_units import ModelUnit
from experiments.pipeline import LMPipeline, PromptBatch
from experiments.pyvene_backend import Site, build_intervenable, collect_sites
from experiments.token_positions import TokenPositionError


@dataclass
class Cell:
    """An intervention site: units patched together, from the same counterfactual input."""

    cell_id: str
    units: list[ModelUnit]

    @property
    def signature(self) -> tuple[Site, ...]:
        return tuple(unit.site for unit in self.units)

    @property
    def spec(self) -> CellSpec:
        featurizer = self.units[0].featurizer.id if self.units else "identity"
        return CellSpec(cell_id=self.cell_id, units=[u.address for u in self.units], featurizer_id=featurizer)


def group_cells(cells: Sequence[Cell], cells_per_forward: int) -> list[list[Cell]]:
    """Cells with equal signatures, in first-seen order, chunked to at most ``cells_per_forward``."""
    by_signature: dict[tuple[Site, ...], list[Cell]] = {}
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


class InterventionEngine:
    """Runs cells over parts of a dataset on one pipeline; intervenable models are built once and reused."""

    def __init__(self, pipeline: LMPipeline):
        self.pipeline = pipeline
        self._intervenables: dict[tuple[tuple[Site, ...], bool], Any] = {}

    def _intervenable(self, signature: tuple[Site, ...], collect: bool = False):
        """The (cached) pyvene wrapper patching, or collecting, these sites."""
        key = (signature, collect)
        if key not in self._intervenables:
            self._intervenables[key] = build_intervenable(self.pipeline.model, list(signature), collect=collect)
        return self._intervenables[key]

    @torch.no_grad()
    def run_part(
        self,
        bases: list[dict[str, Any]],
        counterfactuals: list[dict[str, Any]],
        example_indices: list[int],
        groups: list[list[Cell]],
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Base rows and intervened rows (raw-results schema) for one part of B pairs."""
        pipeline = self.pipeline
        base_batch = pipeline.load(bases)
        cf_batch = pipeline.load(counterfactuals)
        base_rows = pipeline.output_rows(pipeline.generate(base_batch), example_indices)

        sites = sorted({unit.site for group in groups for cell in group for unit in cell.units},
                       key=lambda s: (s.layer, s.component))
        sources = collect_sites(self._intervenable(tuple(sites), collect=True), sites, cf_batch.model_inputs()) if sites else {}

        # token indices of each (position, example), padded-batch coordinates, computed once per part
        base_cols: dict[int, list[list[int]]] = {}
        source_cols: dict[int, list[list[int]]] = {}
        for group in groups:
            for cell in group:
                for unit in cell.units:
                    pos = unit.position
                    if id(pos) in base_cols:
                        continue
                    base_cols[id(pos)], source_cols[id(pos)] = [], []
                    for b, (base, cf) in enumerate(zip(bases, counterfactuals)):
                        on_base, on_source = pos.index(base), pos.counterfactual_index(cf)
                        if len(on_base) != len(on_source):
                            raise TokenPositionError(
                                f"token position {pos.id!r} selects {len(on_base)} token(s) in the base "
                                f"{base.get('raw_input')!r} but {len(on_source)} in the counterfactual "
                                f"{cf.get('raw_input')!r}; an interchange needs equally many on both sides"
                            )
                        base_cols[id(pos)].append([i + base_batch.pad_offsets[b] for i in on_base])
                        source_cols[id(pos)].append([i + cf_batch.pad_offsets[b] for i in on_source])

        cell_rows: list[dict[str, Any]] = []
        for group in groups:
            cell_rows.extend(self._run_group(group, base_batch, sources, base_cols, source_cols, example_indices))
        return base_rows, cell_rows

    def _run_group(
        self,
        group: list[Cell],
        base_batch: PromptBatch,
        sources: dict[Site, torch.Tensor],
        base_cols: dict[int, list[list[int]]],
        source_cols: dict[int, list[list[int]]],
        example_indices: list[int],
    ) -> list[dict[str, Any]]:
        pipeline = self.pipeline
        n_pairs = len(example_indices)
        signature = group[0].signature
        rows = base_batch.select([b for _ in group for b in range(n_pairs)])  # row = cell-major
        device = pipeline.device
        pair_index = torch.arange(n_pairs, device=device).repeat(len(group))

        locations, representations = [], []
        for slot, site in enumerate(signature):
            units = [cell.units[slot] for cell in group]
            base_idx = [base_cols[id(u.position)][b] for u in units for b in range(n_pairs)]
            src_idx = [source_cols[id(u.position)][b] for u in units for b in range(n_pairs)]
            width = max(len(ix) for ix in base_idx + src_idx)
            base_idx = [_pad_to(ix, width) for ix in base_idx]
            src_idx = torch.tensor([_pad_to(ix, width) for ix in src_idx], device=device)  # (R, n)
            full = sources[site]
            if site.unit == "h.pos":  # full: (B, H, T, d); rows take one head at n positions
                heads = torch.tensor([u.head for u in units for _ in range(n_pairs)], device=device)
                per_row = full[pair_index, heads]  # (R, T, d)
                picked = per_row.gather(1, src_idx[..., None].expand(-1, -1, per_row.shape[-1]))
                representations.append(picked[:, None])  # (R, 1, n, d)
                locations.append([[[h] for h in heads.tolist()], base_idx])
            else:  # full: (B, T, d)
                per_row = full[pair_index]
                representations.append(per_row.gather(1, src_idx[..., None].expand(-1, -1, per_row.shape[-1])))
                locations.append(base_idx)

        intervenable = self._intervenable(signature)

        def patched_prompt_pass(inputs: dict[str, Any]):
            _, out = intervenable(
                inputs, unit_locations={"sources->base": (locations, locations)},
                source_representations=representations,
            )
            return out

        generation = pipeline.greedy_decode(rows, patched_prompt_pass)
        out_rows = pipeline.output_rows(generation, [example_indices[b] for _ in group for b in range(n_pairs)])
        for r, row in enumerate(out_rows):
            row["cell_id"] = group[r // n_pairs].cell_id
        return out_rows
