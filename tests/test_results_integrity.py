"""Results folders refuse damaged data: part records (sha256, rows, examples, cells) checked on read,
``RawResults.verify``, the folder lock, temp-file cleanup, file modes, folders without part records,
and step 2 resuming byte-identically (recomputing damaged parts). The first half is torch-free."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from causal.results import (
    PART_RECORD_VERSION,
    CellSpec,
    DatasetRecord,
    FolderLock,
    RawResults,
    RawResultsWriter,
    ResultsError,
    ResultsLockedError,
    ResultsManifest,
    ResultsWarning,
    UnitAddress,
    part_path,
    part_record_path,
)
from causal.results import lock as results_lock

REPO = Path(__file__).resolve().parents[1]
SIZES = {"toy": 5, "other": 5}  # batch 2 -> parts [0, 1], [2, 3], [4]
CELLS = ["c0", "c1"]


def manifest(fingerprints: dict[str, str] | None = None, model_name: str = "m") -> ResultsManifest:
    fingerprints = fingerprints or {}
    return ResultsManifest(
        experiment_id="integrity",
        experiment_type="hand_written",
        model={"name": model_name},
        datasets=[DatasetRecord(dataset_id=d, fingerprint=fingerprints.get(d, f"fp-{d}"), size=n)
                  for d, n in SIZES.items()],
        cells=[CellSpec(cell_id=c, units=[UnitAddress(layer=i, component="block_output", position_id="last")])
               for i, c in enumerate(CELLS)],
        example_batch_size=2,
        cell_groups=[CELLS],
    )


def row(i: int, text: str, **extra) -> dict:
    return {**extra, "example_index": i, "output_text": text, "output_token_ids": [i], "topk_token_ids": [[i, 0]],
            "topk_logits": [[float(i), -1.5]]}


def write_folder(root: Path, m: ResultsManifest | None = None, parts: dict[str, list[int]] | None = None,
                 salt: str = "") -> Path:
    """A hand-written results folder; ``parts``: which parts to write per dataset (default all)."""
    m = m or manifest()
    with RawResultsWriter(root, m, log=None) as writer:
        for did in SIZES:
            for part in (parts or {}).get(did, range(m.n_parts(did))):
                idx = m.part_indices(did, part)
                writer.write_part(did, part, [row(i, f"{did}{i}{salt}") for i in idx],
                                  [row(i, f"{did}{c}{i}{salt}", cell_id=c) for c in CELLS for i in idx])
    return root


def read_all(root: Path) -> None:
    results = RawResults(root)
    for did in SIZES:
        results.base_outputs(did)
    results.intervened_outputs()


def damage_of(root: Path) -> list[tuple[str, int, str]]:
    return [(d.dataset_id, d.part, Path(d.path).name) for d in RawResults(root).verify()]


# ---------------------------------------------------------------------------------------------- records


def test_intact_folder_verifies_and_records_what_each_part_holds(tmp_path):
    root = write_folder(tmp_path / "r")
    results = RawResults(root)
    assert results.verify() == [] and results.is_complete()
    assert (root / "parts" / "format.json").exists()
    record = json.loads(part_record_path(root, "toy", 2).read_text())
    assert record["part_record_version"] == PART_RECORD_VERSION
    assert (record["dataset_id"], record["dataset_fingerprint"], record["part"]) == ("toy", "fp-toy", 2)
    assert record["example_indices"] == [4] and record["cell_ids"] == CELLS
    cells = record["files"]["cells"]
    data = part_path(root, "cells", "toy", 2).read_bytes()
    assert cells["n_rows"] == 2 and cells["n_bytes"] == len(data)
    assert cells["path"] == "cells/toy/part_00002.parquet"
    assert len(results.intervened_outputs()) == 2 * 5 * len(CELLS)


def test_truncated_part_is_refused_on_read_and_listed_by_verify(tmp_path):
    root = write_folder(tmp_path / "r")
    target = part_path(root, "cells", "toy", 1)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultsError) as info:
        RawResults(root).intervened_outputs("toy")
    message = str(info.value)
    assert str(target) in message and "truncated" in message
    assert "delete it and rerun step 2" in message.lower()
    RawResults(root).base_outputs("toy")  # the base file of that part is intact
    assert damage_of(root) == [("toy", 1, target.name)]


def test_part_overwritten_by_another_parts_rows_is_refused(tmp_path):
    root = write_folder(tmp_path / "r")
    shutil.copyfile(part_path(root, "cells", "toy", 1), part_path(root, "cells", "toy", 0))
    with pytest.raises(ResultsError, match="sha256"):
        RawResults(root).intervened_outputs()
    assert damage_of(root) == [("toy", 0, "part_00000.parquet")]

    # the whole part (files and record) copied over another one: the record names the wrong part
    root = write_folder(tmp_path / "r2")
    for kind in ("base", "cells"):
        shutil.copyfile(part_path(root, kind, "toy", 1), part_path(root, kind, "toy", 0))
    shutil.copyfile(part_record_path(root, "toy", 1), part_record_path(root, "toy", 0))
    with pytest.raises(ResultsError, match="belongs to part 1"):
        RawResults(root).base_outputs("toy")
    assert damage_of(root) == [("toy", 0, "part_00000.json")]


def test_part_from_another_dataset_is_refused(tmp_path):
    root = write_folder(tmp_path / "r")
    # a folder of the same experiment whose "toy" dataset has other content (another fingerprint)
    foreign = write_folder(tmp_path / "foreign", manifest({"toy": "fp-something-else"}), salt="x")
    for path in (part_path, part_record_path):
        args = ("cells", "toy", 1) if path is part_path else ("toy", 1)
        shutil.copyfile(path(foreign, *args), path(root, *args))
    shutil.copyfile(part_path(foreign, "base", "toy", 1), part_path(root, "base", "toy", 1))
    with pytest.raises(ResultsError, match="fingerprint"):
        RawResults(root).intervened_outputs()
    # the parquet alone (the record left as it was) fails its hash
    root2 = write_folder(tmp_path / "r2")
    shutil.copyfile(part_path(root2, "cells", "other", 2), part_path(root2, "cells", "toy", 2))
    assert damage_of(root2) == [("toy", 2, "part_00002.parquet")]


def test_record_of_a_different_experiment_is_refused(tmp_path):
    root = write_folder(tmp_path / "r")
    other = write_folder(tmp_path / "o", manifest(model_name="another-model"), salt="y")
    for kind in ("base", "cells"):
        shutil.copyfile(part_path(other, kind, "toy", 0), part_path(root, kind, "toy", 0))
    shutil.copyfile(part_record_path(other, "toy", 0), part_record_path(root, "toy", 0))
    assert [d.reason for d in RawResults(root).verify()] == [
        "record was written by a different experiment (model or settings differ from the manifest)"]


def test_missing_record_is_damage_not_a_finished_part(tmp_path):
    root = write_folder(tmp_path / "r")
    part_record_path(root, "other", 1).unlink()
    results = RawResults(root)
    assert results.missing_parts("other") == [1] and not results.is_intact("other", 1)
    with pytest.raises(ResultsError) as info:
        results.base_outputs("other")
    assert "no part record" in str(info.value) and str(part_path(root, "base", "other", 1)) in str(info.value)
    assert [(d.dataset_id, d.part) for d in results.verify()] == [("other", 1)]


def test_part_files_with_wrong_rows_are_not_written(tmp_path):
    m = manifest()
    with RawResultsWriter(tmp_path / "r", m, log=None) as writer:
        with pytest.raises(ValueError, match="examples"):
            writer.write_part("toy", 1, [row(i, "a") for i in (0, 1)],
                              [row(i, "a", cell_id=c) for c in CELLS for i in (2, 3)])
        with pytest.raises(ValueError, match="expected 4"):
            writer.write_part("toy", 1, [row(i, "a") for i in (2, 3)], [row(i, "a", cell_id="c0") for i in (2, 3)])
        assert not part_path(writer.root, "base", "toy", 1).exists()
        assert writer.missing_parts("toy") == [0, 1, 2]


def test_newer_part_record_version_is_refused_with_an_explanation(tmp_path):
    root = write_folder(tmp_path / "r")
    path = part_record_path(root, "toy", 0)
    record = json.loads(path.read_text())
    record["part_record_version"] = PART_RECORD_VERSION + 1
    path.write_text(json.dumps(record))
    with pytest.raises(ResultsError, match="newer than this code reads"):
        RawResults(root).base_outputs("toy")


def test_folder_without_part_records_is_read_with_a_warning_and_upgraded_by_a_writer(tmp_path):
    root = write_folder(tmp_path / "r")
    shutil.rmtree(root / "parts")  # as written before part records existed
    results = RawResults(root)
    assert not results.has_part_records
    with pytest.warns(ResultsWarning, match="cannot be verified by hash"):
        table = results.intervened_outputs()
    assert len(table) == 2 * 5 * len(CELLS)
    # content checks still apply: rows of another part are caught
    shutil.copyfile(part_path(root, "base", "toy", 1), part_path(root, "base", "toy", 0))
    with pytest.warns(ResultsWarning):
        assert damage_of(root) == [("toy", 0, "part_00000.parquet")]

    lines: list[str] = []
    with RawResultsWriter(root, manifest(), log=lines.append) as writer:
        assert any("recorded 5 part(s)" in line for line in lines)
        assert [(d.dataset_id, d.part) for d in writer.discard_damaged_parts()] == [("toy", 0)]
        assert writer.missing_parts("toy") == [0]
    assert RawResults(root).has_part_records and RawResults(root).verify() == []


# ---------------------------------------------------------------------------------------------- leftovers


def leftover(folder: Path, name: str, data: bytes) -> Path:
    """A temp file exactly as a killed ``atomic_write_bytes`` leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.write(fd, data)
    os.close(fd)
    return Path(tmp)


def test_stray_temp_files_are_removed_under_the_lock(tmp_path):
    root = write_folder(tmp_path / "r", parts={"toy": [0], "other": []})
    strays = [
        leftover(root / "cells" / "toy", "part_00001.parquet", b"PAR1 half"),
        leftover(root / "parts" / "toy", "part_00001.json", b'{"part'),
        leftover(root, "manifest.json", b'{"format_'),
    ]
    keep = root / "cells" / "toy" / "notes.tmp"  # not the temp-file pattern: not ours to delete
    keep.write_text("mine")
    assert RawResults(root).verify() == []  # readers ignore temp files
    lines: list[str] = []
    with RawResultsWriter(root, manifest(), log=lines.append):
        assert not any(p.exists() for p in strays)
        assert keep.exists()
    assert "removed 3 temp file(s)" in lines[0]


def test_manifest_write_interrupted_on_a_new_folder_does_not_block_it(tmp_path):
    root = tmp_path / "r"
    stray = leftover(root, "manifest.json", b'{"format_version": 1, "experi')
    write_folder(root)
    assert not stray.exists() and RawResults(root).verify() == []


def test_unreadable_manifest_without_results_is_rewritten_but_not_with_results(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "manifest.json").write_text('{"format_version": 1, "experi')
    write_folder(root)
    assert RawResults(root).manifest == manifest()
    (root / "manifest.json").write_text('{"format_version": 1, "experi')
    with pytest.raises(ResultsError, match="corrupted"):
        RawResultsWriter(root, manifest(), log=None)


def test_folder_of_unknown_files_is_still_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "data.csv").write_text("x")
    with pytest.raises(ResultsError, match="data.csv"):
        RawResultsWriter(tmp_path / "r", manifest(), log=None)


# ---------------------------------------------------------------------------------------------- lock


def test_second_writer_is_refused_naming_folder_and_holder(tmp_path):
    root = tmp_path / "r"
    with RawResultsWriter(root, manifest(), log=None):
        holder = json.loads((root / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ResultsLockedError) as info:
            RawResultsWriter(root, manifest(), log=None)
        assert str(root) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        start = time.monotonic()
        with pytest.raises(ResultsLockedError, match="after waiting 0.3 s"):
            RawResultsWriter(root, manifest(), wait=True, timeout=0.3, log=None)
        assert time.monotonic() - start >= 0.3
    assert not (root / ".lock").exists()
    RawResultsWriter(root, manifest(), log=None).close()  # free again


def test_waiting_writer_gets_the_folder_when_the_holder_finishes(tmp_path):
    root = tmp_path / "r"
    first = RawResultsWriter(root, manifest(), log=None)
    threading.Timer(0.3, first.close).start()
    with RawResultsWriter(root, manifest(), wait=True, timeout=10, log=None) as second:
        assert second.lock.held and not first.lock.held


HOLD = """
import sys, time
from causal.results import FolderLock
lock = FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_lock_of_another_process_refuses_then_is_taken_over_once_it_died(tmp_path):
    root = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ResultsLockedError, match=f"pid {proc.pid} on host"):
            FolderLock(root).acquire()
    finally:
        proc.kill()
        proc.wait()
    assert json.loads((root / ".lock").read_text())["pid"] == proc.pid  # the dead holder's file is still there
    lock = FolderLock(root).acquire()
    assert lock.taken_over["pid"] == proc.pid
    assert json.loads((root / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_without_flock_takes_over_only_a_dead_processes_file(tmp_path, monkeypatch):
    monkeypatch.setattr(results_lock, "fcntl", None)
    root = tmp_path / "r"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    (root / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": host, "since": "earlier"}))
    with FolderLock(root) as lock:
        assert lock.taken_over["pid"] == int(dead.stdout)
        with pytest.raises(ResultsLockedError, match=f"pid {os.getpid()}"):
            FolderLock(root).acquire()
    (root / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": host, "since": "earlier"}))
    with pytest.raises(ResultsLockedError, match="delete"):
        FolderLock(root).acquire()


# ---------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        root = write_folder(tmp_path / "r")
    finally:
        os.umask(old)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == 1 + 1 + 2 * 3 * 3  # manifest, parts/format.json, 2 datasets x 3 parts x 3 files
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}


# ---------------------------------------------------------------------------------------------- step 2


def _experiment(pipeline, exp_id: str = "sweep"):
    from experiments.engine.intervention_experiment import PatchResidualStream
    from experiments.token_positions import TokenPosition, last_token_position

    positions = [last_token_position(pipeline), TokenPosition(lambda s: [1], pipeline, id="first_digit")]
    return PatchResidualStream(pipeline, list(range(-1, pipeline.num_layers)), positions,
                               config={"id": exp_id, "batch_size": 2})


def _dataset():
    from causal.counterfactual_dataset import CounterfactualDataset

    bases = ["12+34=", "5+6=", "123+4=", "7+70=", "8+9="]
    sources = ["9+87=", "777+1=", "3+3=", "45+5=", "61+2="]
    return CounterfactualDataset.from_dict(
        {"input": [{"raw_input": b} for b in bases], "counterfactual_inputs": [[{"raw_input": s}] for s in sources]},
        id="toy",
    )


def _parquet_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.parquet"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_resume_after_kill_is_byte_identical(family, model_dirs, tmp_path, monkeypatch):
    """Each run starts on a freshly loaded model, as a new process would: the first part computed is
    then the one that runs before any pyvene wrapper exists."""
    from experiments.pipeline import LMPipeline

    def fresh():
        return LMPipeline(str(model_dirs[family]), max_new_tokens=3, device="cpu")

    clean = tmp_path / "clean"
    _experiment(fresh()).perform_interventions(_dataset(), results_dir=clean, verbose=False)

    class Kill(RuntimeError):
        pass

    original = RawResultsWriter.write_part
    written: list[int] = []

    def dies_after_one(self, dataset_id, part, base_rows, cell_rows):
        if written:
            raise Kill("simulated kill")
        original(self, dataset_id, part, base_rows, cell_rows)
        written.append(part)

    monkeypatch.setattr(RawResultsWriter, "write_part", dies_after_one)
    resumed = tmp_path / "resumed"
    with pytest.raises(Kill):
        _experiment(fresh()).perform_interventions(_dataset(), results_dir=resumed, verbose=False)
    monkeypatch.setattr(RawResultsWriter, "write_part", original)
    assert written == [0] and RawResults(resumed).missing_parts("toy") == [1, 2]
    assert not (resumed / ".lock").exists(), "a failed run must release the folder"
    _experiment(fresh()).perform_interventions(_dataset(), results_dir=resumed, verbose=False)

    files = _parquet_files(clean)
    assert files == _parquet_files(resumed) and len(files) == 6
    for rel in files:
        assert pq.read_table(resumed / rel).equals(pq.read_table(clean / rel)), f"{rel} differs after resume"
        assert (resumed / rel).read_bytes() == (clean / rel).read_bytes(), f"{rel} differs after resume"


def test_step2_recomputes_damaged_parts_and_says_which(pipelines, tmp_path, monkeypatch, capsys):
    from experiments.engine.intervention_engine import InterventionEngine

    pipeline = pipelines["gpt2"]
    root = tmp_path / "r"
    first = _experiment(pipeline).perform_interventions(_dataset(), results_dir=root, verbose=False)
    expected = {rel: pq.read_table(root / rel) for rel in _parquet_files(root)}

    truncated = part_path(root, "cells", "toy", 1)
    truncated.write_bytes(truncated.read_bytes()[:100])
    shutil.copyfile(part_path(root, "base", "toy", 0), part_path(root, "base", "toy", 2))
    part_record_path(root, "toy", 0).unlink()
    leftover(root / "cells" / "toy", "part_00001.parquet", b"half")
    assert {d.part for d in first.verify()} == {0, 1, 2}

    calls: list[list[int]] = []
    run_part = InterventionEngine.run_part

    def counting(self, bases, counterfactuals, example_indices, groups):
        calls.append(list(example_indices))
        return run_part(self, bases, counterfactuals, example_indices, groups)

    monkeypatch.setattr(InterventionEngine, "run_part", counting)
    capsys.readouterr()
    again = _experiment(pipeline).perform_interventions(_dataset(), results_dir=root, verbose=False)
    err = capsys.readouterr().err
    assert sorted(calls) == [[0, 1], [2, 3], [4]]
    assert "no part record" in err and "truncated" in err and "sha256" in err and "temp file" in err
    assert again.verify() == []
    for rel, table in expected.items():
        assert pq.read_table(root / rel).equals(table)

    calls.clear()
    _experiment(pipeline).perform_interventions(_dataset(), results_dir=root, verbose=False)
    assert calls == [], "intact parts are not recomputed"


def test_step2_refuses_a_folder_held_by_another_writer(pipelines, tmp_path):
    root = tmp_path / "r"
    with FolderLock(root):
        with pytest.raises(ResultsLockedError, match=str(root)):
            _experiment(pipelines["gpt2"]).perform_interventions(_dataset(), results_dir=root, verbose=False)


def test_results_format_versions(tmp_path):
    """Version-1 manifests (no kinds, no featurizers) are read as identity interchanges; newer ones are refused."""
    import json as _json

    from causal.results import FORMAT_VERSION, MANIFEST_NAME, RawResults, ResultsError

    v1 = {
        "format_version": 1, "experiment_id": "old", "experiment_type": "patch_residual_stream", "model": {},
        "settings": {}, "datasets": [{"dataset_id": "d", "fingerprint": "f", "size": 1}],
        "cells": [{"cell_id": "c", "units": [{"layer": 0, "component": "block_output", "position_id": "last"}],
                   "featurizer_id": "identity"}],
        "example_batch_size": 1, "cell_groups": [["c"]],
    }
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / MANIFEST_NAME).write_text(_json.dumps(v1))
    manifest = RawResults.read_manifest(tmp_path / "v1")
    assert manifest.cells[0].kind == "interchange" and manifest.cells[0].units[0].featurizer_id == "identity"
    newer = {**v1, "format_version": FORMAT_VERSION + 1}
    (tmp_path / "v9").mkdir()
    (tmp_path / "v9" / MANIFEST_NAME).write_text(_json.dumps(newer))
    with pytest.raises(ResultsError, match="newer than this version reads"):
        RawResults.read_manifest(tmp_path / "v9")


def test_old_import_path_still_works_and_warns(monkeypatch):
    """``causal.raw_results`` re-exports the moved names for one release, with a DeprecationWarning on import."""
    import importlib

    import causal.results as results

    monkeypatch.delitem(sys.modules, "causal.raw_results", raising=False)
    with pytest.warns(DeprecationWarning, match="causal.raw_results moved to causal.results"):
        old = importlib.import_module("causal.raw_results")
    for name in results.__all__:
        assert getattr(old, name) is getattr(results, name), name
    assert old.RawResultsWriter.write_part is RawResultsWriter.write_part
