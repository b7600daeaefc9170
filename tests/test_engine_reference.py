"""Experiments end to end (perform_interventions -> results folder) against the plain-hook reference,
interchange properties, and resumable / validated results folders. Tiny GPT-2 and tiny Llama."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from causal.counterfactual_dataset import CounterfactualDataset
from causal.results import RawResults, ResultsError
from experiments.backends import BACKENDS
from experiments.engine.intervention_engine import InterventionEngine
from experiments.engine.intervention_experiment import PatchResidualStream
from experiments.pipeline import LMPipeline
from experiments.token_positions import TokenPosition, last_token_position
from hook_reference import RefUnit, assert_rows_match, reference_cell

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

FAMILIES = ("gpt2", "llama")
BASES = ["12+34=", "5+6=", "123+4=", "7+70=", "8+9="]
SOURCES = ["9+87=", "777+1=", "3+3=", "45+5=", "61+2="]
BATCH = 2  # 5 examples -> parts [0, 1], [2, 3], [4] (the last one ragged)
PARTS = [[0, 1], [2, 3], [4]]


def dataset(bases=BASES, sources=SOURCES, id="toy") -> CounterfactualDataset:
    return CounterfactualDataset.from_dict(
        {"input": [{"raw_input": b} for b in bases], "counterfactual_inputs": [[{"raw_input": s}] for s in sources]},
        id=id,
    )


def sweep_positions(pipeline: LMPipeline) -> list[TokenPosition]:
    return [last_token_position(pipeline), TokenPosition(lambda s: [1], pipeline, id="first_digit")]


def sweep(pipeline: LMPipeline, layers=None, positions=None, exp_id="sweep", backend="hooks") -> PatchResidualStream:
    layers = list(range(-1, pipeline.num_layers)) if layers is None else layers
    positions = sweep_positions(pipeline) if positions is None else positions
    return PatchResidualStream(pipeline, layers, positions,
                               config={"id": exp_id, "batch_size": BATCH, "backend": backend})


def py(value):
    """Parquet round-trip gives numpy arrays for list columns: back to plain Python lists."""
    if isinstance(value, np.ndarray):
        return [py(v) for v in value]
    if isinstance(value, (list, tuple)):
        return [py(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def rows_of(frame: pd.DataFrame) -> list[dict]:
    return [{k: py(v) for k, v in rec.items()} for rec in frame.to_dict("records")]


def cell_rows(results: RawResults, cell_id: str, examples: list[int]) -> list[dict]:
    table = results.intervened_outputs("toy")
    sub = table[(table.cell_id == cell_id) & table.example_index.isin(examples)].sort_values("example_index")
    return rows_of(sub)


def as_python_table(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(rows_of(frame), columns=frame.columns)


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_sweep_matches_hook_reference(backend, family, pipelines, tmp_path):
    pipeline = pipelines[family]
    exp = sweep(pipeline, backend=backend)
    results = exp.perform_interventions(dataset(), results_dir=tmp_path / "run", verbose=False)
    table = results.intervened_outputs("toy")
    assert len(table) == len(exp.cells) * len(BASES) == (pipeline.num_layers + 1) * 2 * len(BASES)
    base_table = rows_of(results.base_outputs("toy"))
    for part, idx in enumerate(PARTS):
        bases = [{"raw_input": BASES[i]} for i in idx]
        sources = [{"raw_input": SOURCES[i]} for i in idx]
        assert_rows_match(base_table[idx[0] : idx[-1] + 1], reference_cell(pipeline, bases, sources, []),
                          where=f"{family} base part {part}")
        for cell in exp.cells:
            unit = cell.units[0]
            ref = reference_cell(pipeline, bases, sources, [(RefUnit(unit.layer, unit.component), unit.position)])
            assert_rows_match(cell_rows(results, cell.cell_id, idx), ref, where=f"{family} {cell.cell_id} part {part}")


# ---------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_patching_with_the_base_itself_changes_nothing(backend, family, pipelines, tmp_path):
    pipeline = pipelines[family]
    results = sweep(pipeline, backend=backend).perform_interventions(dataset(sources=BASES), results_dir=tmp_path / "self", verbose=False)
    base = {r["example_index"]: r for r in rows_of(results.base_outputs("toy"))}
    table = rows_of(results.intervened_outputs("toy"))
    assert len(table) == (pipeline.num_layers + 1) * 2 * len(BASES)
    for row in table:
        ref = base[row["example_index"]]
        assert row["output_token_ids"] == ref["output_token_ids"], row["cell_id"]
        assert row["topk_token_ids"] == ref["topk_token_ids"], row["cell_id"]
        np.testing.assert_allclose(row["topk_logits"], ref["topk_logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_patching_every_position_reproduces_the_source(backend, family, pipelines, tmp_path):
    """Same-length prompts, every token patched at layer l.

    At every layer the prompt pass from layer l+1 on IS the source's, so the first-step logits equal the
    source's own. The whole greedy answer equals the source's only at layer -1 (embeddings): at l >= 0
    the KV cache of layers <= l still holds the base's keys/values, which later tokens attend to.
    """
    pipeline = pipelines[family]
    bases, sources = ["12+34=", "5+6=", "123+4="], ["98+76=", "7+1=", "3+300="]
    every = TokenPosition(lambda s: list(range(len(pipeline.tokenize_one(s)["input_ids"]))), pipeline, id="every")
    results = sweep(pipeline, positions=[every], backend=backend).perform_interventions(
        dataset(bases, sources), results_dir=tmp_path / "all", verbose=False
    )
    own = pipeline.output_rows(pipeline.generate([{"raw_input": s} for s in sources]), [0, 1, 2])
    base = rows_of(results.base_outputs("toy"))
    for layer in range(-1, pipeline.num_layers):
        rows = cell_rows(results, f"L{layer}@every", [0, 1, 2])
        for row, src, b in zip(rows, own, base):
            assert row["topk_token_ids"][0] == src["topk_token_ids"][0]
            np.testing.assert_allclose(row["topk_logits"][0], src["topk_logits"][0], atol=1e-5, rtol=0)
            assert row["topk_logits"][0] != b["topk_logits"][0]
            if layer == -1:
                assert row["output_token_ids"] == src["output_token_ids"]
                np.testing.assert_allclose(row["topk_logits"], src["topk_logits"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- results folders


class _Kill(RuntimeError):
    pass


def _count_parts(monkeypatch, fail_on_call: int | None = None) -> list[list[int]]:
    """Wrap ``InterventionEngine.run_part``: record each call's example indices; optionally die on the n-th."""
    calls: list[list[int]] = []
    original = InterventionEngine.run_part

    def wrapped(self, bases, counterfactuals, example_indices, groups):
        calls.append(list(example_indices))
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise _Kill("simulated kill")
        return original(self, bases, counterfactuals, example_indices, groups)

    monkeypatch.setattr(InterventionEngine, "run_part", wrapped)
    return calls


def _tables(results: RawResults) -> tuple[pd.DataFrame, pd.DataFrame]:
    return as_python_table(results.base_outputs("toy")), as_python_table(results.intervened_outputs("toy"))


@pytest.fixture(scope="module")
def uninterrupted(pipelines, tmp_path_factory):
    """family -> (base table, intervened table, folder) of a run that was never interrupted."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"clean-{family}")
        out[family] = (*_tables(sweep(pipelines[family]).perform_interventions(dataset(), results_dir=folder, verbose=False)),
                       folder)
    return out


def assert_same_parquet_files(folder, reference) -> None:
    """Every part file of ``folder`` holds exactly the table of the same file in ``reference``."""
    files = sorted(p.relative_to(reference) for p in reference.rglob("*.parquet"))
    assert files == sorted(p.relative_to(folder) for p in folder.rglob("*.parquet")) and files
    for rel in files:
        assert pq.read_table(folder / rel).equals(pq.read_table(reference / rel)), f"{rel} differs"


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_after_kill(family, pipelines, uninterrupted, tmp_path, monkeypatch):
    pipeline = pipelines[family]
    folder = tmp_path / "killed"
    calls = _count_parts(monkeypatch, fail_on_call=2)
    with pytest.raises(_Kill):
        sweep(pipeline).perform_interventions(dataset(), results_dir=folder, verbose=False)
    assert calls == PARTS[:2]
    assert RawResults(folder).missing_parts("toy") == [1, 2]
    with pytest.raises(ResultsError, match="incomplete"):
        RawResults(folder).intervened_outputs("toy")

    calls = _count_parts(monkeypatch)
    results = sweep(pipeline).perform_interventions(dataset(), results_dir=folder, verbose=False)
    assert calls == PARTS[1:], "finished parts must not be recomputed"
    base, cells = _tables(results)
    pd.testing.assert_frame_equal(base, uninterrupted[family][0])
    pd.testing.assert_frame_equal(cells, uninterrupted[family][1])
    assert_same_parquet_files(folder, uninterrupted[family][2])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("deleted", "part"), [("cells/toy/part_00000.parquet", 0), ("parts/toy/part_00002.json", 2)])
def test_resume_after_deleted_part_file(family, deleted, part, pipelines, uninterrupted, tmp_path, monkeypatch):
    pipeline = pipelines[family]
    folder = tmp_path / "partial"
    sweep(pipeline).perform_interventions(dataset(), results_dir=folder, verbose=False)
    (folder / deleted).unlink()
    calls = _count_parts(monkeypatch)
    results = sweep(pipeline).perform_interventions(dataset(), results_dir=folder, verbose=False)
    assert calls == [PARTS[part]]
    base, cells = _tables(results)
    pd.testing.assert_frame_equal(base, uninterrupted[family][0])
    pd.testing.assert_frame_equal(cells, uninterrupted[family][1])
    assert_same_parquet_files(folder, uninterrupted[family][2])


def test_rerun_in_same_process_on_a_fresh_pipeline_resumes(model_dirs, tmp_path, monkeypatch):
    """A pipeline whose model has never been wrapped by pyvene yet (config without ``head_dim``):
    running the engine must not change the model fingerprint, else the rerun sees 'a different experiment'."""
    pipeline = LMPipeline(str(model_dirs["gpt2"]), max_new_tokens=3, device="cpu")
    before = pipeline.config.to_json_string(use_diff=False)
    folder = tmp_path / "fresh"
    first = sweep(pipeline, layers=[0]).perform_interventions(dataset(), results_dir=folder, verbose=False)
    assert pipeline.config.to_json_string(use_diff=False) == before, "the backend mutated the model config"
    calls = _count_parts(monkeypatch)
    again = sweep(pipeline, layers=[0]).perform_interventions(dataset(), results_dir=folder, verbose=False)
    assert calls == []
    pd.testing.assert_frame_equal(_tables(again)[1], _tables(first)[1])


def test_folder_of_a_different_experiment_is_refused(pipelines, tmp_path):
    pipeline = pipelines["gpt2"]
    folder = tmp_path / "taken"
    sweep(pipeline, layers=[0]).perform_interventions(dataset(), results_dir=folder, verbose=False)
    with pytest.raises(ResultsError, match="different experiment"):
        sweep(pipeline, layers=[0, 1]).perform_interventions(dataset(), results_dir=folder, verbose=False)
    with pytest.raises(ResultsError, match="different experiment"):
        sweep(pipelines["llama"], layers=[0]).perform_interventions(dataset(), results_dir=folder, verbose=False)
    moved = [last_token_position(pipeline), TokenPosition(lambda s: [2], pipeline, id="first_digit")]
    with pytest.raises(ResultsError, match="settings.position_probe"):  # same id, other tokens
        sweep(pipeline, layers=[0], positions=moved).perform_interventions(dataset(), results_dir=folder, verbose=False)


def test_corrupted_part_file_and_missing_manifest(pipelines, tmp_path):
    pipeline = pipelines["gpt2"]
    folder = tmp_path / "damaged"
    sweep(pipeline, layers=[0]).perform_interventions(dataset(), results_dir=folder, verbose=False)
    part = folder / "cells" / "toy" / "part_00001.parquet"
    part.write_bytes(b"\x00garbage\xffnot parquet" * 10)
    with pytest.raises(ResultsError) as info:
        RawResults(folder).intervened_outputs()
    assert str(part) in str(info.value)

    (folder / "manifest.json").unlink()
    with pytest.raises(ResultsError, match="manifest.json"):
        RawResults(folder)
    with pytest.raises(ResultsError):
        RawResults(tmp_path / "never-created")


# ---------------------------------------------------------------------------------------------- settings


def test_cells_per_forward_does_not_change_results(pipelines, tmp_path):
    """Folding 1 cell per forward (several groups per signature) or all cells gives the same outputs."""
    pipeline = pipelines["llama"]
    folded = sweep(pipeline).perform_interventions(dataset(), results_dir=tmp_path / "folded", verbose=False)
    exp = PatchResidualStream(pipeline, [-1, 0, 1], sweep_positions(pipeline),
                              config={"id": "sweep", "batch_size": BATCH, "max_rows_per_forward": 1})
    assert exp.config.cells_per_forward == 1
    single = exp.perform_interventions(dataset(), results_dir=tmp_path / "single", verbose=False)
    a, b = rows_of(folded.intervened_outputs("toy")), rows_of(single.intervened_outputs("toy"))
    key = lambda r: (r["cell_id"], r["example_index"])  # noqa: E731
    for ra, rb in zip(sorted(a, key=key), sorted(b, key=key)):
        assert key(ra) == key(rb) and ra["output_token_ids"] == rb["output_token_ids"]
        np.testing.assert_allclose(ra["topk_logits"], rb["topk_logits"], atol=1e-5, rtol=0)


def test_counterfactual_index_selects_the_source(pipelines, tmp_path):
    pipeline = pipelines["gpt2"]
    two = CounterfactualDataset.from_dict(
        {"input": [{"raw_input": b} for b in BASES],
         "counterfactual_inputs": [[{"raw_input": b}, {"raw_input": s}] for b, s in zip(BASES, SOURCES)]},
        id="toy",
    )
    exp = PatchResidualStream(pipeline, [0], sweep_positions(pipeline),
                              config={"id": "k1", "batch_size": BATCH, "counterfactual_index": 1})
    second = exp.perform_interventions(two, results_dir=tmp_path / "k1", verbose=False)
    plain = sweep(pipeline, layers=[0], exp_id="k1").perform_interventions(dataset(), results_dir=tmp_path / "p", verbose=False)
    pd.testing.assert_frame_equal(as_python_table(second.intervened_outputs("toy")),
                                  as_python_table(plain.intervened_outputs("toy")))
    bad = PatchResidualStream(pipeline, [0], sweep_positions(pipeline),
                              config={"id": "k2", "batch_size": BATCH, "counterfactual_index": 2})
    with pytest.raises(ValueError, match="no counterfactual input #2"):
        bad.perform_interventions(two, results_dir=tmp_path / "k2", verbose=False)


# ---------------------------------------------------------------------------------------------- ambiguous positions


def test_positions_sharing_an_id_are_not_confused(pipelines):
    """The engine keys positions by object, not by id: each cell patches at its own position's tokens.
    (The experiment refuses such ids: see test_experiment_refuses_two_positions_with_one_id.)"""
    from experiments.engine.intervention_engine import Cell, group_cells
    from experiments.engine.model_units import ResidualStream

    pipeline = pipelines["llama"]
    first = TokenPosition(lambda s: [1], pipeline, id="p")
    second = TokenPosition(lambda s: [-1], pipeline, id="p")
    cells = [Cell("a", [ResidualStream(0, first)]), Cell("b", [ResidualStream(0, second)])]
    bases, sources = [{"raw_input": b} for b in BASES[:3]], [{"raw_input": s} for s in SOURCES[:3]]
    _, rows = InterventionEngine(pipeline).run_part(bases, sources, [0, 1, 2], group_cells(cells, 8))
    for cell_id, position in (("a", first), ("b", second)):
        ref = reference_cell(pipeline, bases, sources, [(RefUnit(0, "block_output"), position)])
        assert_rows_match([r for r in rows if r["cell_id"] == cell_id], ref, where=f"cell {cell_id}")
    outputs = {c: [r["output_token_ids"] for r in rows if r["cell_id"] == c] for c in ("a", "b")}
    assert outputs["a"] != outputs["b"]  # the two positions really are different patches here


def test_unequal_base_and_source_position_counts_are_refused(pipelines):
    from experiments.engine.intervention_engine import Cell, group_cells
    from experiments.engine.model_units import ResidualStream
    from experiments.token_positions import TokenPositionError, substring_position

    pipeline = pipelines["gpt2"]
    operand = substring_position(pipeline, lambda s: s["raw_input"].split("+")[0], id="first_operand")
    bases = [{"raw_input": "123+4="}, {"raw_input": "5+6="}]     # 3 tokens, 1 token
    sources = [{"raw_input": "5+6="}, {"raw_input": "777+1="}]   # 1 token, 3 tokens
    with pytest.raises(TokenPositionError, match="equally many"):
        InterventionEngine(pipeline).run_part(bases, sources, [0, 1], group_cells([Cell("c", [ResidualStream(0, operand)])], 8))


def test_experiment_refuses_two_positions_with_one_id(pipelines):
    pipeline = pipelines["llama"]
    first = TokenPosition(lambda s: [1], pipeline, id="p")
    second = TokenPosition(lambda s: [-1], pipeline, id="p")
    from experiments.engine.intervention_engine import Cell
    from experiments.engine.intervention_experiment import InterventionExperiment
    from experiments.engine.model_units import ResidualStream

    with pytest.raises(ValueError, match="share the id 'p'"):
        InterventionExperiment(pipeline, [Cell("a", [ResidualStream(0, first)]), Cell("b", [ResidualStream(0, second)])])
