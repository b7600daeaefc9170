"""Sweeps split over many processes or machines: shards of parts and cell ranges, a verified merge, a Ray executor.

A sweep's unit of work is a *part* (a dataset's batch of pairs: one base file and one cells file), or,
with M cell blocks per part, one of M contiguous ranges of a part's forward batches (a *cell block*:
its own base and cells files under ``blocks/``). Shard i of n takes every n-th unit of the experiment's
deterministic unit list ((dataset, part, block) in dataset, part, block order) —
``perform_interventions(..., shard=(i, n), cell_blocks=M)``; by default M is just large enough that
every shard gets work (ceil(n / parts)). Each shard writes its own results folder with the
experiment's manifest (same identity as the unsharded run) and resumes like any results folder.
``merge_shards`` checks that every shard holds the same experiment and that together they hold every
part once (duplicates must be byte-identical) or all of its verified cell blocks (put together in the
experiment's cell order), then writes one ordinary results folder. ``run_shards_on_ray`` spreads the
shards over a Ray cluster's workers (the optional ``ray`` extra) and merges; ``scripts/slurm_sweep.sh``
does the same with a SLURM job array.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from causal.results import (
    BLOCKS_DIR,
    MANIFEST_NAME,
    PARTS_DIR,
    PARTS_FORMAT_NAME,
    RawResults,
    RawResultsWriter,
    ResultsError,
    atomic_write_json,
    part_path,
    part_record_path,
)

Shard = tuple[int, int]


def parse_shard(text: str) -> Shard:
    """``"i/n"`` → (i, n) with 0 ≤ i < n (a clear ValueError otherwise)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"a shard is written i/n (e.g. 0/4), got {text!r}")
    return check_shard((int(match.group(1)), int(match.group(2))))


def check_shard(shard: Sequence[int]) -> Shard:
    """Validated (i, n)."""
    if len(shard) != 2:
        raise ValueError(f"a shard is (index, count), got {shard!r}")
    index, count = int(shard[0]), int(shard[1])
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
    return index, count


def shard_items(items: Sequence[Any], shard: Shard | None) -> list[Any]:
    """Items k with k % n == i (all items for ``shard=None``)."""
    if shard is None:
        return list(items)
    index, count = check_shard(shard)
    return [item for k, item in enumerate(items) if k % count == index]


def shard_dir(root: str | os.PathLike[str], shard: Shard) -> Path:
    """``root/<i>-of-<n>``: where shard i of n writes its results folder."""
    index, count = check_shard(shard)
    return Path(root) / f"{index}-of-{count}"


def merge_shards(shard_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> RawResults:
    """One results folder at ``out`` from shard folders: same experiment (manifest identity) in every shard,
    every part present (in exactly one shard, or byte-identical copies). Raises ``ResultsError`` otherwise;
    ``out`` must be new, empty, or an earlier merge of the same experiment."""
    shard_dirs = [Path(d) for d in shard_dirs]
    if not shard_dirs:
        raise ResultsError("no shard folders to merge")
    manifests = [RawResults.read_manifest(d) for d in shard_dirs]
    identity = manifests[0].identity()
    for folder, manifest in zip(shard_dirs, manifests):
        if manifest.identity() != identity:
            raise ResultsError(f"{folder} holds a different experiment than {shard_dirs[0]}; shards must share "
                               f"the experiment (model, settings, datasets, cells, batch size)")
    manifest = manifests[0]
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        if RawResults.read_manifest(out).identity() != identity:
            raise ResultsError(f"{out} already holds results of a different experiment")
    elif out.exists() and any(out.iterdir()):
        raise ResultsError(f"{out} is not empty and holds no {MANIFEST_NAME}; merge into a new folder")

    missing: list[str] = []
    sources: dict[Path, Path] = {}  # relative part path -> shard file
    assembled: list[tuple[str, int, dict[str, pd.DataFrame]]] = []  # parts put together from cell blocks
    readers = [RawResults(d) for d in shard_dirs]
    order = {cell_id: k for k, cell_id in enumerate(c for group in manifest.cell_groups for c in group)}
    for record in manifest.datasets:
        for part in range(manifest.n_parts(record.dataset_id)):
            files = [part_path(Path(""), kind, record.dataset_id, part) for kind in ("base", "cells")]
            if all((d / PARTS_DIR).is_dir() for d in shard_dirs):  # integrity records travel with their parts
                files.append(part_record_path(Path(""), record.dataset_id, part))
            if not any((d / files[0]).exists() for d in shard_dirs):
                frames, problem = _from_blocks(readers, record.dataset_id, part, order)
                if frames is None:
                    missing.append(f"{record.dataset_id} part {part} ({problem})")
                else:
                    assembled.append((record.dataset_id, part, frames))
                continue
            for rel in files:
                kind = rel.parts[0]
                holders = [d / rel for d in shard_dirs if (d / rel).exists()]
                if not holders:
                    missing.append(f"{record.dataset_id} part {part} ({kind})")
                    continue
                for other in holders[1:]:
                    if not filecmp.cmp(holders[0], other, shallow=False):
                        raise ResultsError(f"{rel} differs between {holders[0]} and {other}")
                sources[rel] = holders[0]
    if missing:
        raise ResultsError(f"shards are incomplete: {len(missing)} part file(s) missing, e.g. {missing[:3]}; "
                           f"rerun the unfinished shards (they resume)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MANIFEST_NAME, manifest.model_dump(mode="json"))
    if (shard_dirs[0] / PARTS_DIR / PARTS_FORMAT_NAME).exists():
        (out / PARTS_DIR).mkdir(exist_ok=True)
        shutil.copyfile(shard_dirs[0] / PARTS_DIR / PARTS_FORMAT_NAME, out / PARTS_DIR / PARTS_FORMAT_NAME)
    for rel, source in sorted(sources.items()):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".merging")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    if assembled:
        with RawResultsWriter(out, manifest, log=None) as writer:
            for dataset_id, part, frames in assembled:
                writer.write_part_frames(dataset_id, part, frames)
    results = RawResults(out)
    if not results.is_complete():
        raise ResultsError(f"merged folder {out} is incomplete")
    damaged = results.verify()
    if damaged:
        raise ResultsError(f"merged folder {out} has damaged parts, e.g. {damaged[0]}")
    return results


def _from_blocks(readers: list[RawResults], dataset_id: str, part: int, order: dict[str, int]
                 ) -> tuple[dict[str, pd.DataFrame] | None, str]:
    """A part's tables put together from its verified cell blocks (any shard), cells in the experiment's
    order; or (None, what is missing). Copies of a block in several shards must be byte-identical; the
    blocks of a split must hold every cell exactly once and the same base rows (``ResultsError`` otherwise).
    Blocks of an abandoned split (another M) are ignored when exactly one split is complete."""
    counts = sorted({int(m.group(1)) for r in readers
                     for m in [re.search(r"-of-(\d+)\.json$", p.name)
                               for p in (r.root / BLOCKS_DIR / dataset_id).glob(f"part_{part:05d}.block_*.json")] if m})
    if not counts:
        return None, "no part files and no cell blocks"
    found: dict[int, list[tuple[dict[str, pd.DataFrame], Any]] | str] = {}
    for n_blocks in counts:
        blocks: list[tuple[dict[str, pd.DataFrame], Any]] = []
        for block in range(n_blocks):
            copies, reasons = [], []
            for reader in readers:
                frames, record, why = reader.load_block(dataset_id, part, (block, n_blocks))
                if frames is not None:
                    copies.append((frames, record))
                elif why != "not written":
                    reasons.append(why)
            if not copies:
                found[n_blocks] = f"cell block {block} of {n_blocks} " + (f"damaged: {reasons[0]}" if reasons
                                                                         else "missing")
                break
            digests = {tuple(sorted((k, f.sha256) for k, f in record.files.items())) for _, record in copies}
            if len(digests) > 1:
                raise ResultsError(f"shards hold different copies of cell block {block} of {n_blocks} of part {part} "
                                   f"of dataset {dataset_id!r}")
            blocks.append(copies[0])
        else:
            found[n_blocks] = blocks
    complete = [m for m, v in found.items() if not isinstance(v, str)]
    if len(complete) != 1:
        if not complete:
            return None, "; ".join(str(v) for v in found.values())
        raise ResultsError(f"part {part} of dataset {dataset_id!r} has complete cell blocks for several splits "
                           f"({complete} blocks); delete the blocks/ files of the splits not wanted")
    blocks = found[complete[0]]  # type: ignore[assignment]
    cell_lists = [record.cell_ids for _, record in blocks]
    flat = [c for cells in cell_lists for c in cells]
    if len(flat) != len(set(flat)) or set(flat) != set(order):
        raise ResultsError(f"the {complete[0]} cell blocks of part {part} of dataset {dataset_id!r} do not hold every "
                           f"cell exactly once ({len(flat)} cells listed, {len(set(flat))} distinct, {len(order)} "
                           f"in the experiment): they were cut from different plans; delete them and rerun the shards")
    tables = [frames for frames, _ in blocks]
    base = tables[0]["base"]
    for other in tables[1:]:
        if not other["base"].equals(base):
            raise ResultsError(f"cell blocks of part {part} of dataset {dataset_id!r} hold different base rows")
    # empty blocks left out, so column types stay those of real rows
    cells = pd.concat([t["cells"] for t in tables if len(t["cells"])] or [tables[0]["cells"]], ignore_index=True)
    rank = cells["cell_id"].map(order)
    cells = cells.iloc[rank.argsort(kind="stable").to_numpy()].reset_index(drop=True)
    return {"base": base, "cells": cells}, ""


def _run_one_shard(factory: Callable[..., Any], factory_args: tuple, shard: Shard, shards_root: str,
                   cell_blocks: int | None = None) -> int:
    """Build (experiment, datasets) with ``factory(*factory_args)`` and run one shard; returns how many units
    (parts and cell blocks) its folder holds."""
    experiment, datasets = factory(*factory_args)
    folder = shard_dir(shards_root, shard)
    results = experiment.perform_interventions(datasets, results_dir=folder, verbose=False, shard=shard,
                                               cell_blocks=cell_blocks)
    return sum(len(list((folder / sub / d).glob(pattern))) for d in results.dataset_ids
               for sub, pattern in (("cells", "*.parquet"), (BLOCKS_DIR, "*.json")))


def run_shards_on_ray(
    factory: Callable[..., Any],
    factory_args: tuple,
    n_shards: int,
    shards_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    address: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    verbose: bool = True,
    ray_init_kwargs: dict[str, Any] | None = None,
    cell_blocks: int | None = None,
) -> RawResults:
    """Run ``n_shards`` shards as Ray tasks (``num_cpus``/``num_gpus`` each) on the cluster at ``address``
    (None: the current or a new local Ray instance), then ``merge_shards`` into ``out``.

    ``factory(*factory_args) -> (experiment, datasets)`` runs on the worker (it loads the model there), so it
    must be importable or picklable; ``shards_root`` and ``out`` must be on a filesystem every worker sees.
    Finished shards' parts are kept: rerunning resumes each shard. ``cell_blocks``: see
    ``perform_interventions`` (default: enough cell ranges per part for every shard to get work).
    """
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("run_shards_on_ray needs Ray: pip install 'causal-abstraction[ray]' (or ray>=2.9)") from exc
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(address=address, **(ray_init_kwargs or {}))
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_run_one_shard)
    shards = [(i, n_shards) for i in range(n_shards)]
    pending = {remote.remote(factory, factory_args, shard, str(shards_root), cell_blocks): shard for shard in shards}
    failures: list[str] = []
    with tqdm(total=n_shards, desc="shards", disable=not verbose) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(done[0])
            try:
                parts = ray.get(done[0])
                bar.set_postfix_str(f"shard {shard[0]}: {parts} units")
            except Exception as exc:  # keep the other shards' work; report every failure at the end
                failures.append(f"shard {shard[0]}/{shard[1]}: {exc}")
            bar.update(1)
    if failures:
        raise RuntimeError("some shards failed (rerun to resume them): " + "; ".join(failures))
    return merge_shards([shard_dir(shards_root, s) for s in shards], out)
