"""Row budget: cells × pairs are split to fit ``max_rows_per_forward``; on out-of-memory the budget is halved
and the failed forward redone in halves, with the same results. The memory limit is a layer pre-hook that
raises the error a device raises when a forward carries more rows than it can hold."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from experiments.engine.intervention_engine import Cell, InterventionEngine, group_cells, is_out_of_memory
from experiments.engine.model_units import ResidualStream
from experiments.token_positions import TokenPosition

BASES = [{"raw_input": s} for s in ("12+34=", "5+6=", "123+45=")]
SOURCES = [{"raw_input": s} for s in ("98+76=", "7+1=", "300+99=")]


def cells(pipeline) -> list[Cell]:
    positions = [TokenPosition(lambda s, k=k: [-k], pipeline, id=f"m{k}") for k in (1, 2, 3)]
    return [Cell(f"L{layer}@{p.id}", [ResidualStream(layer, p)]) for layer in range(-1, pipeline.num_layers)
            for p in positions]


class DeviceLimit:
    """Raises ``error`` from the first decoder layer when a forward carries more than ``rows`` rows."""

    def __init__(self, pipeline, rows: int, error: Exception):
        self.rows, self.error, self.tripped = rows, error, 0
        self.handle = pipeline.model.model.layers[0].register_forward_pre_hook(self.check, with_kwargs=True)

    def check(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] > self.rows:
            self.tripped += 1
            raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run(engine, all_cells):
    _, rows = engine.run_part(BASES, SOURCES, [0, 1, 2], group_cells(all_cells, 64))
    by_cell = defaultdict(list)
    for row in rows:
        by_cell[row["cell_id"]].append(row)
    return dict(by_cell)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for cell_id in a:
        for x, y in zip(a[cell_id], b[cell_id], strict=True):
            assert x["output_token_ids"] == y["output_token_ids"]
            torch.testing.assert_close(torch.tensor(x["topk_logits"]), torch.tensor(y["topk_logits"]), atol=1e-5, rtol=0)


def test_error_classification():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize("suffix_reuse", [False, True])
@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory."),
                                   RuntimeError("DefaultCPUAllocator: out of memory")])
def test_out_of_memory_halves_the_budget_with_the_same_results(pipelines, suffix_reuse, error):
    pipeline = pipelines["llama"]
    all_cells = cells(pipeline)  # 9 cells × 3 pairs = 27 rows
    expected = run(InterventionEngine(pipeline, "hooks", suffix_reuse=suffix_reuse, max_rows_per_forward=512), all_cells)
    engine = InterventionEngine(pipeline, "hooks", suffix_reuse=suffix_reuse, max_rows_per_forward=512)
    with DeviceLimit(pipeline, rows=7, error=error) as limit, pytest.warns(RuntimeWarning, match="out of memory"):
        got = run(engine, all_cells)
    assert limit.tripped >= 1
    assert engine.max_rows_per_forward < 27
    assert_same(got, expected)


def test_budget_splits_groups_up_front(pipelines):
    pipeline = pipelines["llama"]
    all_cells = cells(pipeline)
    expected = run(InterventionEngine(pipeline, "hooks", suffix_reuse=False), all_cells)
    engine = InterventionEngine(pipeline, "hooks", suffix_reuse=False, max_rows_per_forward=6)
    with DeviceLimit(pipeline, rows=6, error=RuntimeError("out of memory")) as limit:
        got = run(engine, all_cells)
    assert limit.tripped == 0 and engine.max_rows_per_forward == 6
    assert_same(got, expected)


def test_other_errors_and_a_cell_that_never_fits_are_raised(pipelines):
    pipeline = pipelines["llama"]
    with DeviceLimit(pipeline, rows=7, error=RuntimeError("shape mismatch")), pytest.raises(RuntimeError, match="shape"):
        run(InterventionEngine(pipeline, "hooks", suffix_reuse=False), cells(pipeline))
    # fewer rows than one cell's pairs: nothing left to halve, the error reaches the caller
    with DeviceLimit(pipeline, rows=2, error=RuntimeError("out of memory")), \
            pytest.raises(RuntimeError, match="out of memory"):
        run(InterventionEngine(pipeline, "hooks", suffix_reuse=False), cells(pipeline))
