"""Intervention experiments: a list of cells run over counterfactual datasets, resumably, to raw results.

``perform_interventions(datasets)`` needs no causal model: it records what the network does
(base output and intervened output per dataset × cell × example) in a results folder.
Score it afterwards against any causal model with ``causal.compute_interchange_scores``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from causal.counterfactual_dataset import CounterfactualDataset, as_dataset_dict
from causal.results import DatasetRecord, RawResults, RawResultsWriter, ResultsManifest
from experiments.backends import DEFAULT_BACKEND
from experiments.featurizers import Featurizer
from experiments.engine.fleet import check_shard, shard_items
from experiments.engine.intervention_engine import Cell, InterventionEngine, group_cells
from experiments.model_identity import weights_identity
from experiments.engine.model_units import ModelUnit
from experiments.pipeline import LMPipeline
from experiments.token_positions import TokenPosition


class ExperimentConfig(BaseModel):
    """Settings of an intervention experiment.

    ``batch_size``: pairs per part (per results file; also the resume granularity).
    ``max_rows_per_forward``: cells × pairs folded into one forward (memory knob; on a GPU raise it);
    halved automatically on out-of-memory (the failed forward is redone in halves, nothing finished is lost).
    ``backend``: "hooks" (plain torch hooks, the default) or "pyvene"; recorded in the manifest.
    ``suffix_reuse``: on the hooks backend, single-unit site cells recompute only what a patch can change
    (``experiments.backends.suffix_reuse``; exact, so not part of the experiment's identity).
    ``pack_sites``: cells of different activation sites share forwards (up to ``max_rows_per_forward`` rows;
    hooks backend). Fewer forwards, the same answers; the logits can differ at float rounding from unpacked
    forwards, so it is part of the experiment's identity (recorded when on).
    """

    model_config = ConfigDict(extra="forbid")

    id: str = "experiment"
    batch_size: int = Field(32, gt=0)
    max_rows_per_forward: int = Field(512, gt=0)
    counterfactual_index: int = Field(0, ge=0)
    results_dir: str | None = None
    backend: Literal["hooks", "pyvene"] = DEFAULT_BACKEND
    suffix_reuse: bool = True
    pack_sites: bool = False

    @property
    def cells_per_forward(self) -> int:
        return max(1, self.max_rows_per_forward // self.batch_size)


def model_fingerprint(pipeline: LMPipeline) -> dict[str, Any]:
    """What identifies the network: name (folder name for local checkpoints), class, config, the full content hash
    of the weights (`experiments.model_identity`)."""
    model = pipeline.model
    local = Path(pipeline.name)
    return {
        "name": local.name if local.exists() else pipeline.name,
        "class": type(model).__name__,
        "config_sha256": hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest(),
        **weights_identity(model, pipeline.weight_files),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype),
        "device_type": pipeline.device.type,
        "tokenizer_vocab_size": len(pipeline.tokenizer),
        "max_new_tokens": pipeline.max_new_tokens,
        "top_k": pipeline.top_k,
        "use_chat_template": pipeline.use_chat_template,
    }


class InterventionExperiment:
    """Base class: ``cells`` (unit lists patched together) × datasets → a results folder."""

    experiment_type = "intervention"

    def __init__(self, pipeline: LMPipeline, cells: list[Cell], config: ExperimentConfig | Mapping[str, Any] | None = None):
        self.pipeline = pipeline
        self.config = config if isinstance(config, ExperimentConfig) else ExperimentConfig(**(config or {}))
        if not cells:
            raise ValueError("an experiment needs at least one cell")
        ids = [c.cell_id for c in cells]
        if len(set(ids)) != len(ids):
            raise ValueError("cell ids must be unique")
        positions: dict[str, TokenPosition] = {}
        for cell in cells:
            for unit in cell.units:
                unit.validate(pipeline)
                if positions.setdefault(unit.position.id, unit.position) is not unit.position:
                    raise ValueError(f"two different token positions share the id {unit.position.id!r}; ids must be unique")
        self.cells = cells
        self.engine = InterventionEngine(pipeline, self.config.backend, suffix_reuse=self.config.suffix_reuse,
                                         max_rows_per_forward=self.config.max_rows_per_forward,
                                         pack_sites=self.config.pack_sites)

    def _manifest(self, datasets: list[CounterfactualDataset], groups: list[list[Cell]]) -> ResultsManifest:
        return ResultsManifest(
            experiment_id=self.config.id,
            experiment_type=self.experiment_type,
            model=model_fingerprint(self.pipeline),
            settings={"counterfactual_index": self.config.counterfactual_index,
                      "backend": self.config.backend,
                      "max_rows_per_forward": self.config.max_rows_per_forward,
                      "position_probe": self._position_probe(datasets),
                      # (non-default only, so folders written before this setting was recorded keep their identity)
                      **({} if self.config.suffix_reuse else {"suffix_reuse": False}),
                      **({"pack_sites": True} if self.config.pack_sites else {})},
            datasets=[DatasetRecord(dataset_id=d.id, fingerprint=d.fingerprint(), size=len(d)) for d in datasets],
            cells=[c.spec for c in self.cells],
            example_batch_size=self.config.batch_size,
            cell_groups=[[c.cell_id for c in g] for g in groups],
        )

    def _position_probe(self, datasets: list[CounterfactualDataset]) -> dict[str, list[list[int]]]:
        """Each position's token indices on the first pair of every dataset (base side, source side):
        a position whose indexer changed under the same id makes a different experiment."""
        positions = {u.position.id: u.position for c in self.cells for u in c.units}
        k = self.config.counterfactual_index
        probe = {}
        for pid, pos in positions.items():
            probe[pid] = []
            for dataset in datasets:
                first = dataset[0]
                if len(first["counterfactual_inputs"]) > k:
                    probe[pid] += [pos.index(first["input"]), pos.counterfactual_index(first["counterfactual_inputs"][k])]
        return probe

    def _check_inputs(self, datasets: list[CounterfactualDataset]) -> None:
        """Refuse, before anything is written, an example without counterfactual input #k or with a
        prompt the model cannot take (empty, too long)."""
        k = self.config.counterfactual_index
        for dataset in datasets:
            prompts, labels = [], []
            for i, example in enumerate(dataset):
                have = len(example["counterfactual_inputs"])
                if have <= k:
                    raise ValueError(f"example {i} of dataset {dataset.id!r} has no counterfactual input #{k} "
                                     f"(it has {have}; counterfactual_index is {k})")
                prompts += [example["input"], example["counterfactual_inputs"][k]]
                labels += [f"dataset {dataset.id!r} example {i} input",
                           f"dataset {dataset.id!r} example {i} counterfactual input #{k}"]
            self.pipeline.check_prompts(prompts, labels=labels)

    def perform_interventions(
        self,
        datasets: CounterfactualDataset | Sequence[CounterfactualDataset] | Mapping[str, CounterfactualDataset],
        results_dir: str | Path | None = None,
        verbose: bool = True,
        wait_for_lock: bool = False,
        lock_timeout: float | None = None,
        shard: tuple[int, int] | None = None,
        cell_blocks: int | None = None,
        restart: bool = False,
    ) -> RawResults:
        """Run every cell on every pair; resume a folder holding the same experiment. Returns the results.

        On resume every finished part is verified (sha256, rows); damaged ones are deleted, reported
        on stderr and recomputed. ``restart=True`` first discards the folder's results (its manifest, base,
        cells, parts and blocks), e.g. after the manifest was deleted or damaged. The folder is locked while this runs: a second writer raises
        ``ResultsLockedError`` unless ``wait_for_lock`` (waits up to ``lock_timeout`` seconds if given).
        ``shard=(i, n)``: only every n-th unit of work from the i-th (``experiments.engine.fleet``); the folder then
        holds that shard's work, to be combined with ``experiments.engine.fleet.merge_shards``. A unit is a part, or
        with ``cell_blocks=M`` > 1 one of M contiguous cell ranges of a part (ranges of the part's forward
        batches, ``InterventionEngine.plan``, so each cell runs exactly as in one process). Default M: just
        enough that every shard gets work, ceil(n / number of parts).
        """
        if cell_blocks is not None and cell_blocks < 1:
            raise ValueError(f"cell_blocks must be >= 1, got {cell_blocks}")
        items = list(as_dataset_dict(datasets).values())
        self._check_inputs(items)
        root = Path(results_dir or self.config.results_dir or Path("results") / self.config.id)
        groups = group_cells(self.cells, self.config.cells_per_forward)
        with RawResultsWriter(root, self._manifest(items, groups), wait=wait_for_lock, timeout=lock_timeout,
                              restart=restart) as writer:
            for problem in writer.discard_damaged_parts():
                print(f"{root}: recomputing damaged {problem}", file=sys.stderr, flush=True)
            k = self.config.counterfactual_index
            bs = self.config.batch_size
            missing = {(d.id, p) for d in items for p in writer.missing_parts(d.id)}
            every_part = [(d, p) for d in items for p in range(-(-len(d) // bs))]  # shard membership is fixed
            auto = -(-check_shard(shard)[1] // max(1, len(every_part))) if shard is not None else 1
            blocks = 1 if shard is None else (auto if cell_blocks is None else cell_blocks)
            units = [(d, p, b) for d, p in every_part for b in range(blocks)]
            finished = writer.results()

            def block_plan(dataset: CounterfactualDataset, part: int, block: int) -> list[list[list[Cell]]]:
                """Block ``block``'s forward batches, planned with the configured row budget (never the one an
                out-of-memory retry lowered), so every shard cuts the same blocks."""
                n_pairs = min(len(dataset), (part + 1) * bs) - part * bs
                batches = self.engine.plan(groups, n_pairs, self.config.max_rows_per_forward)
                return batches[block * len(batches) // blocks : (block + 1) * len(batches) // blocks]

            def block_cells(batches: list[list[list[Cell]]]) -> list[str]:
                return [c.cell_id for batch in batches for g in batch for c in g]

            todo = [(d, p, b) for d, p, b in shard_items(units, shard) if (d.id, p) in missing
                    and (blocks == 1 or finished.load_block(d.id, p, (b, blocks),
                                                            block_cells(block_plan(d, p, b)))[0] is None)]
            unit = "parts" if blocks == 1 else f"cell blocks ({blocks} per part)"
            for dataset, part, block in tqdm(todo, desc=f"{self.config.id}: {unit}", disable=not verbose or not todo):
                indices = list(range(part * bs, min(len(dataset), (part + 1) * bs)))
                examples = [dataset[i] for i in indices]  # every example was checked by _check_inputs
                bases = [ex["input"] for ex in examples]
                sources = [ex["counterfactual_inputs"][k] for ex in examples]
                if blocks == 1:
                    base_rows, cell_rows = self.engine.run_part(bases, sources, indices, groups)
                    writer.write_part(dataset.id, part, base_rows, cell_rows)
                    continue
                mine = block_plan(dataset, part, block)
                block_groups = [g for batch in mine for g in batch]
                base_rows, cell_rows = self.engine.run_part(bases, sources, indices, block_groups, batches=mine)
                writer.write_block(dataset.id, part, (block, blocks), block_cells(mine), base_rows, cell_rows)
            return writer.results()


class MissingFeaturizerError(ValueError):
    """A featurized sweep names a cell without a trained featurizer (never replaced by a full-vector swap)."""


def check_featurizers_cover(cell_ids: Sequence[str], featurizers: Mapping[str, Featurizer]) -> None:
    """Every cell has its featurizer and every featurizer names a cell of the sweep; otherwise one line."""
    missing = [c for c in cell_ids if featurizers.get(c) is None]
    unknown = sorted(set(featurizers) - set(cell_ids))
    if missing:
        raise MissingFeaturizerError(f"{len(missing)} cell(s) have no trained featurizer ({', '.join(missing[:6])}"
                                     f"{', …' if len(missing) > 6 else ''}): train them or leave them out of the sweep")
    if unknown:
        raise MissingFeaturizerError(f"featurizers for cells not in the sweep: {', '.join(unknown[:6])}")


class PatchUnits(InterventionExperiment):
    """Patch one component at every (layer, position) cell: the usual localisation sweep. With
    ``featurizers`` (cell id ``L{layer}@{position}`` → featurizer) every cell interchanges through its own
    featurizer; a cell without one is refused before any work (`MissingFeaturizerError`)."""

    experiment_type = "patch_units"

    def __init__(
        self,
        pipeline: LMPipeline,
        layers: Sequence[int],
        token_positions: Sequence[TokenPosition],
        component: str = "block_output",
        config: ExperimentConfig | Mapping[str, Any] | None = None,
        featurizers: Mapping[str, Featurizer] | None = None,
    ):
        grid = [(f"L{layer}@{pos.id}", layer, pos) for layer in layers for pos in token_positions]
        if featurizers is not None:
            check_featurizers_cover([cell_id for cell_id, _, _ in grid], featurizers)
        cells = [Cell(cell_id, [ModelUnit(layer, component, pos,
                                          featurizer=featurizers[cell_id] if featurizers is not None else Featurizer())])
                 for cell_id, layer, pos in grid]
        self.layers = list(layers)
        self.token_positions = list(token_positions)
        self.component = component
        super().__init__(pipeline, cells, config)


class PatchResidualStream(PatchUnits):
    """Residual-stream interchange at every (layer, position); layer -1 = embeddings."""

    experiment_type = "patch_residual_stream"

    def __init__(self, pipeline: LMPipeline, layers: Sequence[int], token_positions: Sequence[TokenPosition],
                 config: ExperimentConfig | Mapping[str, Any] | None = None,
                 featurizers: Mapping[str, Featurizer] | None = None):
        super().__init__(pipeline, layers, token_positions, "block_output", config, featurizers)


class PatchAttentionHeads(InterventionExperiment):
    """Patch groups of attention heads: each entry of ``layer_head_lists`` (a list of (layer, head)) × each position
    is a cell (id ``L{layer}H{head}@{position}``). With ``featurizers`` (cell id → featurizer; single heads only)
    every cell interchanges through its own featurizer, as `PatchUnits`."""

    experiment_type = "patch_attention_heads"

    def __init__(
        self,
        pipeline: LMPipeline,
        layer_head_lists: Sequence[Sequence[tuple[int, int]]],
        token_positions: Sequence[TokenPosition],
        config: ExperimentConfig | Mapping[str, Any] | None = None,
        featurizers: Mapping[str, Featurizer] | None = None,
    ):
        grid = []
        for heads in layer_head_lists:
            if not heads:
                raise ValueError("each entry of layer_head_lists needs at least one (layer, head)")
            if featurizers is not None and len(heads) > 1:
                raise ValueError(f"featurized head sweeps take single heads; {heads} is a group")
            name = "+".join(f"L{l}H{h}" for l, h in heads)
            grid += [(f"{name}@{pos.id}", heads, pos) for pos in token_positions]
        if featurizers is not None:
            check_featurizers_cover([cell_id for cell_id, _, _ in grid], featurizers)
        cells = []
        for cell_id, heads, pos in grid:
            featurizer = featurizers[cell_id] if featurizers is not None else Featurizer()
            cells.append(Cell(cell_id, [ModelUnit(l, "head_attention_value_output", pos, head=h, featurizer=featurizer)
                                        for l, h in heads]))
        self.layer_head_lists = [list(map(tuple, heads)) for heads in layer_head_lists]
        self.token_positions = list(token_positions)
        super().__init__(pipeline, cells, config)

    @staticmethod
    def every_head(pipeline: LMPipeline, layers: Sequence[int] | None = None) -> list[list[tuple[int, int]]]:
        """One single-head group per (layer, head)."""
        layers = range(pipeline.num_layers) if layers is None else layers
        return [[(l, h)] for l in layers for h in range(pipeline.num_heads)]
