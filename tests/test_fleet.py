"""Sharded sweeps: 3 shards (and a local Ray cluster) give results identical to one process; the merge
verifies identity and completeness; shards resume; the SLURM recipe's dry run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from causal.counterfactual_dataset import CounterfactualDataset
from causal.results import ResultsError, part_path
from experiments.engine.fleet import merge_shards, parse_shard, shard_dir, shard_items

REPO = Path(__file__).resolve().parents[1]
PAIRS = [("12+34=", "98+76="), ("5+6=", "7+1="), ("123+45=", "300+99="), ("1+2=", "3+4="),
         ("44+5=", "6+77="), ("9+9=", "8+8="), ("31+13=", "13+31=")]


def make_dataset(pairs=PAIRS) -> CounterfactualDataset:
    return CounterfactualDataset.from_dict(
        {"input": [{"raw_input": b} for b, _ in pairs], "counterfactual_inputs": [[{"raw_input": s}] for _, s in pairs]},
        id="sums",
    )


def build(model_dir: str, config_overrides: dict | None = None):
    """(experiment, datasets) for a small residual-stream + head sweep; importable by Ray workers."""
    from experiments.engine.intervention_experiment import PatchResidualStream
    from experiments.pipeline import LMPipeline
    from experiments.token_positions import TokenPosition

    pipeline = LMPipeline(model_dir, max_new_tokens=2, device="cpu")
    positions = [TokenPosition(lambda s, k=k: [-k], pipeline, id=f"m{k}") for k in (1, 2, 3)]
    config = {"id": "fleet", "batch_size": 2, "max_rows_per_forward": 8, **(config_overrides or {})}
    experiment = PatchResidualStream(pipeline, [-1, 0, 1], positions, config=config)
    return experiment, make_dataset()


def tables(results) -> tuple[pd.DataFrame, pd.DataFrame]:
    return results.base_outputs("sums"), results.intervened_outputs("sums")


def assert_same_results(a, b) -> None:
    for x, y in zip(tables(a), tables(b), strict=True):
        pd.testing.assert_frame_equal(x.reset_index(drop=True), y.reset_index(drop=True))


@pytest.fixture(scope="module")
def single(model_dirs, tmp_path_factory):
    experiment, dataset = build(str(model_dirs["llama"]))
    return experiment.perform_interventions(dataset, results_dir=tmp_path_factory.mktemp("single") / "r", verbose=False)


def test_parse_and_split():
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "a/2", "1", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    items = list(range(10))
    shards = [shard_items(items, (i, 3)) for i in range(3)]
    assert sorted(sum(shards, [])) == items and shards[0] == [0, 3, 6, 9]


def test_three_shards_merge_to_the_single_process_results(model_dirs, tmp_path, single):
    experiment, dataset = build(str(model_dirs["llama"]))
    for i in range(3):
        experiment.perform_interventions(dataset, results_dir=shard_dir(tmp_path / "shards", (i, 3)),
                                         verbose=False, shard=(i, 3))
    n_parts = -(-len(PAIRS) // 2)
    held = [len(list((shard_dir(tmp_path / "shards", (i, 3)) / "cells" / "sums").glob("*.parquet"))) for i in range(3)]
    assert sum(held) == n_parts and all(held)
    merged = merge_shards([shard_dir(tmp_path / "shards", (i, 3)) for i in range(3)], tmp_path / "merged")
    assert merged.is_complete()
    assert_same_results(merged, single)


def test_merge_refuses_missing_parts_and_foreign_shards(model_dirs, tmp_path):
    experiment, dataset = build(str(model_dirs["llama"]))
    dirs = [shard_dir(tmp_path / "shards", (i, 2)) for i in range(2)]
    experiment.perform_interventions(dataset, results_dir=dirs[0], verbose=False, shard=(0, 2))
    with pytest.raises(ResultsError, match="incomplete"):
        merge_shards(dirs[:1], tmp_path / "merged")
    other, _ = build(str(model_dirs["llama"]), {"batch_size": 3})
    other.perform_interventions(dataset, results_dir=dirs[1], verbose=False, shard=(1, 2))
    with pytest.raises(ResultsError, match="different experiment"):
        merge_shards(dirs, tmp_path / "merged")


def test_a_shard_resumes_its_own_parts(model_dirs, tmp_path, single):
    experiment, dataset = build(str(model_dirs["llama"]))
    dirs = [shard_dir(tmp_path / "shards", (i, 2)) for i in range(2)]
    for i, folder in enumerate(dirs):
        experiment.perform_interventions(dataset, results_dir=folder, verbose=False, shard=(i, 2))
    lost = part_path(dirs[1], "cells", "sums", 1)
    kept = part_path(dirs[1], "cells", "sums", 3)
    stamp = kept.stat().st_mtime_ns
    lost.unlink()
    experiment.perform_interventions(dataset, results_dir=dirs[1], verbose=False, shard=(1, 2))
    assert lost.exists() and kept.stat().st_mtime_ns == stamp
    assert_same_results(merge_shards(dirs, tmp_path / "merged"), single)


def test_shards_on_a_local_ray_cluster(model_dirs, tmp_path, single):
    """Parts split into cell ranges, spread over a local Ray cluster: the same results as one process."""
    ray = pytest.importorskip("ray")
    from experiments.engine.fleet import run_shards_on_ray

    paths = os.pathsep.join([str(REPO), str(REPO / "tests")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": paths, "OMP_NUM_THREADS": "1"}})
    try:
        merged = run_shards_on_ray(build, (str(model_dirs["llama"]),), 3, tmp_path / "shards", tmp_path / "merged",
                                   verbose=False, cell_blocks=2)  # 4 parts x 2 cell ranges over 3 shards
    finally:
        ray.shutdown()
    assert_same_results(merged, single)


def test_slurm_recipe_dry_run():
    env = {**os.environ, "DRY_RUN": "1", "SBATCH_ARGS": "--gres=gpu:1 --time=01:00:00", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "scripts" / "slurm_sweep.sh"), "4", "--model", "organism", "--digits", "3"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 2
    shards, merge = out
    assert "--array=0-3" in shards and "--gres=gpu:1" in shards
    assert r"--shard\ \$SLURM_ARRAY_TASK_ID/4" in shards and r"--digits\ 3" in shards
    assert "--dependency=afterok:" in merge and r"--merge-shards\ 4" in merge
    # the step-2 parser accepts what the array tasks pass
    sys.path.insert(0, str(REPO))
    from tasks.general_addition.study import study_parser

    args = study_parser(None).parse_args(["--shard", "2/4", "--cell-blocks", "3"])
    assert args.shard == (2, 4) and args.cell_blocks == 3
    bad = subprocess.run(["bash", str(REPO / "scripts" / "slurm_sweep.sh"), "0"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2


def test_cell_range_shards_merge_byte_identical_to_one_process(model_dirs, tmp_path, single):
    """With more shards than parts, parts are split into cell ranges; the merge is byte-identical."""
    experiment, dataset = build(str(model_dirs["llama"]), {"batch_size": 8})  # one part of 7 pairs
    whole = experiment.perform_interventions(dataset, results_dir=tmp_path / "one", verbose=False)
    roots = [shard_dir(tmp_path / "shards", (i, 3)) for i in range(3)]
    for i in range(3):
        experiment.perform_interventions(dataset, results_dir=roots[i], verbose=False, shard=(i, 3))
    held = [sorted(p.name for p in (r / "blocks" / "sums").glob("*.json")) for r in roots]
    assert held == [["part_00000.block_0-of-3.json"], ["part_00000.block_1-of-3.json"],
                    ["part_00000.block_2-of-3.json"]]
    assert all(not (r / "cells" / "sums").exists() or not any((r / "cells" / "sums").iterdir()) for r in roots)
    merged = merge_shards(roots, tmp_path / "merged")
    for kind in ("base", "cells"):
        assert part_path(merged.root, kind, "sums", 0).read_bytes() == part_path(whole.root, kind, "sums", 0).read_bytes()
    assert_same_results(merged, whole)


def test_cell_blocks_resume_and_an_incomplete_merge_is_refused(model_dirs, tmp_path):
    experiment, dataset = build(str(model_dirs["llama"]))  # 4 parts of 2 pairs
    root = shard_dir(tmp_path / "shards", (0, 2))
    experiment.perform_interventions(dataset, results_dir=root, verbose=False, shard=(0, 2), cell_blocks=3)
    records = sorted((root / "blocks" / "sums").glob("*.json"))
    assert len(records) == 6  # units (part, block) 0, 2, 4, ... of 12
    stamps = {p: p.stat().st_mtime_ns for p in records}
    victim = records[1]
    victim.with_name(victim.name.replace(".json", ".cells.parquet")).write_bytes(b"garbage")
    experiment.perform_interventions(dataset, results_dir=root, verbose=False, shard=(0, 2), cell_blocks=3)
    rewritten = [p for p in records if p.stat().st_mtime_ns != stamps[p]]
    assert rewritten == [victim], "only the damaged block is recomputed"
    with pytest.raises(ResultsError, match="incomplete"):
        merge_shards([root], tmp_path / "merged")
    other = shard_dir(tmp_path / "shards", (1, 2))
    experiment.perform_interventions(dataset, results_dir=other, verbose=False, shard=(1, 2), cell_blocks=3)
    merged = merge_shards([root, other], tmp_path / "merged")
    reference = experiment.perform_interventions(dataset, results_dir=tmp_path / "one", verbose=False)
    for part in range(4):
        for kind in ("base", "cells"):
            assert (part_path(merged.root, kind, "sums", part).read_bytes()
                    == part_path(reference.root, kind, "sums", part).read_bytes())


def test_an_out_of_memory_retry_in_one_shard_keeps_the_blocks_aligned(model_dirs, tmp_path):
    """Blocks are cut from the configured row budget, not from the one an out-of-memory retry lowered."""
    config = {"batch_size": 4, "max_rows_per_forward": 24}
    roots = [shard_dir(tmp_path / "shards", (i, 2)) for i in range(2)]
    first, dataset = build(str(model_dirs["llama"]), config)
    first.perform_interventions(dataset, results_dir=roots[0], verbose=False, shard=(0, 2), cell_blocks=2)
    second, dataset = build(str(model_dirs["llama"]), config)
    real, calls = second.engine._run_suffix_groups, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    second.engine._run_suffix_groups = fails_once
    with pytest.warns(RuntimeWarning, match="out of memory"):
        second.perform_interventions(dataset, results_dir=roots[1], verbose=False, shard=(1, 2), cell_blocks=2)
    assert second.engine.max_rows_per_forward < 24
    merged = merge_shards(roots, tmp_path / "merged")
    whole, dataset = build(str(model_dirs["llama"]), config)
    one = whole.perform_interventions(dataset, results_dir=tmp_path / "one", verbose=False)
    for a, b in zip(tables(merged), tables(one), strict=True):
        assert a["output_token_ids"].map(list).tolist() == b["output_token_ids"].map(list).tolist()


def test_a_block_cut_from_another_plan_is_recomputed(model_dirs, tmp_path):
    experiment, dataset = build(str(model_dirs["llama"]), {"batch_size": 8})  # one part, 3 blocks
    root = shard_dir(tmp_path / "shards", (0, 1))
    real_plan = experiment.engine.plan
    experiment.engine.plan = lambda *args: list(reversed(real_plan(*args)))  # a foreign cut
    experiment.perform_interventions(dataset, results_dir=root, verbose=False, shard=(0, 1), cell_blocks=3)
    experiment.engine.plan = real_plan
    stamps = {p: p.stat().st_mtime_ns for p in (root / "blocks" / "sums").glob("*.json")}
    experiment.perform_interventions(dataset, results_dir=root, verbose=False, shard=(0, 1), cell_blocks=3)
    assert any(p.stat().st_mtime_ns != t for p, t in stamps.items()), "blocks holding other cells are redone"
    single = experiment.perform_interventions(dataset, results_dir=tmp_path / "one", verbose=False)
    merged = merge_shards([root], tmp_path / "merged")
    assert part_path(merged.root, "cells", "sums", 0).read_bytes() == part_path(single.root, "cells", "sums", 0).read_bytes()


def test_shards_with_another_suffix_setting_are_another_experiment(model_dirs, tmp_path):
    roots = [shard_dir(tmp_path / "shards", (i, 2)) for i in range(2)]
    for i, fast in enumerate((True, False)):
        experiment, dataset = build(str(model_dirs["llama"]), {"batch_size": 4, "suffix_reuse": fast})
        experiment.perform_interventions(dataset, results_dir=roots[i], verbose=False, shard=(i, 2), cell_blocks=2)
    with pytest.raises(ResultsError, match="different experiment"):
        merge_shards(roots, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
