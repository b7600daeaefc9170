"""Suffix reuse (residual-stream fast path of the hooks backend) is exact: same token ids and logits
within 1e-5 as the generic path, on every family, with left padding, for every layer × position,
block inputs and outputs, whole-answer generation and single-token reads, ablations and featurizers."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from conftest import FAMILIES
from experiments.featurizers import LinearFeaturizer
from experiments.engine.intervention_engine import Cell, InterventionEngine, group_cells
from experiments.engine.model_units import AttentionHead, AttentionOutput, MLPOutput, ModelUnit, ResidualStream
from experiments.backends.sites import Site, SitePatch
from experiments.backends.suffix_reuse import SuffixReuse
from experiments.token_positions import TokenPosition

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

# different lengths: left padding differs per row; positions are unpadded indices from the end
BASES = [{"raw_input": s} for s in ("12+34=", "5+6=", "123+45=")]
SOURCES = [{"raw_input": s} for s in ("98+76=", "7+1=", "300+99=")]
EXAMPLES = [0, 1, 2]


def positions(pipeline) -> list[TokenPosition]:
    """Every token of the shortest prompt, counted from the end, plus a two-token position."""
    shortest = min(len(pipeline.tokenize_one(b)["input_ids"]) for b in BASES)
    single = [TokenPosition(lambda s, k=k: [-k], pipeline, id=f"m{k}") for k in range(1, shortest + 1)]
    return single + [TokenPosition(lambda s: [-4, -2], pipeline, id="pair")]


def residual_cells(pipeline) -> list[Cell]:
    cells = []
    for layer in range(pipeline.num_layers):
        for component in ("block_input", "block_output"):
            for pos in positions(pipeline):
                cells.append(Cell(f"{component}{layer}@{pos.id}", [ResidualStream(layer, pos, component)]))
    return cells


def run(pipeline, cells, suffix_reuse: bool, max_new_tokens: int | None = None, max_rows: int = 512):
    engine = InterventionEngine(pipeline, "hooks", suffix_reuse=suffix_reuse, max_rows_per_forward=max_rows)
    saved = pipeline.max_new_tokens
    if max_new_tokens is not None:
        pipeline.max_new_tokens = max_new_tokens
    try:
        base_rows, rows = engine.run_part(BASES, SOURCES, EXAMPLES, group_cells(cells, 64))
    finally:
        pipeline.max_new_tokens = saved
    by_cell = defaultdict(list)
    for row in rows:
        by_cell[row["cell_id"]].append(row)
    return base_rows, dict(by_cell)


def assert_same(fast, slow):
    assert fast.keys() == slow.keys()
    for cell_id in slow:
        for a, b in zip(fast[cell_id], slow[cell_id], strict=True):
            assert a["example_index"] == b["example_index"]
            assert a["output_token_ids"] == b["output_token_ids"], cell_id
            torch.testing.assert_close(torch.tensor(a["topk_logits"]), torch.tensor(b["topk_logits"]),
                                       atol=1e-5, rtol=0, msg=cell_id)


def changed_share(base_rows, rows) -> float:
    base = {r["example_index"]: r["output_token_ids"] for r in base_rows}
    flat = [r for cell_rows in rows.values() for r in cell_rows]
    return sum(r["output_token_ids"] != base[r["example_index"]] for r in flat) / len(flat)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_new_tokens", [1, 3])
def test_suffix_reuse_matches_generic_path(family, max_new_tokens, pipelines):
    pipeline = pipelines[family]
    width = pipeline.load(BASES).input_ids.shape[1]
    assert SuffixReuse(pipeline).supports(width) is None, "the fast path must apply to every tested family"
    cells = residual_cells(pipeline)
    base_fast, fast = run(pipeline, cells, True, max_new_tokens)
    base_slow, slow = run(pipeline, cells, False, max_new_tokens)
    assert base_fast == base_slow
    assert_same(fast, slow)
    assert changed_share(base_slow, slow) > 0.05, "patching must change some answers for the check to bite"


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_suffix_reuse_ablations_featurizers_and_small_batches(family, pipelines):
    pipeline = pipelines[family]
    pos = positions(pipeline)
    g = torch.Generator().manual_seed(0)
    rotation = LinearFeaturizer(torch.linalg.qr(torch.randn(pipeline.hidden_size, pipeline.hidden_size,
                                                            generator=g))[0], id="rotation")
    mean = torch.randn(pipeline.hidden_size, generator=g)
    cells = []
    for layer in range(pipeline.num_layers):
        for p in pos[:3]:
            cells.append(Cell(f"zero{layer}@{p.id}", [ResidualStream(layer, p)], kind="zero_ablation"))
            cells.append(Cell(f"mean{layer}@{p.id}", [ResidualStream(layer, p, "block_input")],
                              kind="mean_ablation", ablation_values=[mean]))
            unit = ModelUnit(layer, "block_output", p, featurizer=rotation, feature_indices=tuple(range(0, 64, 2)))
            cells.append(Cell(f"feat{layer}@{p.id}", [unit]))
    # a tiny row budget: every group runs in its own fast pass
    _, fast = run(pipeline, cells, True, max_rows=3)
    _, slow = run(pipeline, cells, False)
    assert_same(fast, slow)


def in_layer_cells(pipeline, featurizers: bool = False) -> list[Cell]:
    """Attention output, MLP output, MLP neurons and two heads at every layer × position (the two-token one
    included); interchanges, zero ablations and (``featurizers``) rotated subspace interchanges."""
    g = torch.Generator().manual_seed(1)
    d = pipeline.hidden_size
    rotation = LinearFeaturizer(torch.linalg.qr(torch.randn(d, d, generator=g))[0], id="rotation")
    cells = []
    for layer in range(pipeline.num_layers):
        for p in positions(pipeline):
            units = [AttentionOutput(layer, p), MLPOutput(layer, p), ModelUnit(layer, "mlp_neurons", p),
                     AttentionHead(layer, 0, p), AttentionHead(layer, pipeline.num_heads - 1, p)]
            for unit in units:
                cells.append(Cell(unit.id, [unit]))
            cells.append(Cell(f"zero.{units[0].id}", [units[0]], kind="zero_ablation"))
            if featurizers:
                unit = ModelUnit(layer, "mlp_output", p, featurizer=rotation, feature_indices=tuple(range(0, d, 3)))
                cells.append(Cell(f"feat.{unit.id}", [unit]))
    return cells


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_new_tokens", [1, 3])
def test_in_layer_cells_take_the_suffix_path_exactly(family, max_new_tokens, pipelines):
    """A patch inside layer j becomes the residual patch of layer j's output: same answers and logits as the
    generic path for attention/MLP outputs, neurons, heads, ablations and featurizers, on every family."""
    pipeline = pipelines[family]
    cells = in_layer_cells(pipeline, featurizers=max_new_tokens == 1)
    engine = InterventionEngine(pipeline, "hooks")
    assert all(engine._suffix_eligible([cell]) for cell in cells), "every in-layer cell must take the fast path"
    base_fast, fast = run(pipeline, cells, True, max_new_tokens)
    base_slow, slow = run(pipeline, cells, False, max_new_tokens)
    assert base_fast == base_slow
    assert_same(fast, slow)
    assert changed_share(base_slow, slow) > 0.05, "patching must change some answers for the check to bite"


def test_layer_outputs_refuses_residual_sites(pipelines):
    pipeline = pipelines["llama"]
    reuse = SuffixReuse(pipeline)
    base = reuse.base_pass(pipeline.load(BASES))
    patch = SitePatch(Site(0, "block_output"), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, 64))
    with pytest.raises(ValueError, match="not inside a layer"):
        reuse.layer_outputs(base, patch, torch.zeros(1, dtype=torch.long))


def test_last_layer_output_before_read_needs_no_compute(pipelines):
    """Patching the last layer's output before the read position leaves the answer at the base answer."""
    pipeline = pipelines["llama"]
    last = pipeline.num_layers - 1
    pos = positions(pipeline)[1]  # second-to-last token
    base_rows, rows = run(pipeline, [Cell("top", [ResidualStream(last, pos)])], True)
    assert [r["output_token_ids"] for r in rows["top"]] == [r["output_token_ids"] for r in base_rows]


def test_fast_path_declines_beyond_sliding_window(pipelines):
    pipeline = pipelines["gemma2"]
    reuse = SuffixReuse(pipeline)
    assert reuse.supports(int(pipeline.config.sliding_window)) == "prompt reaches the sliding window"


@pytest.mark.parametrize("family,implementation", [("llama", "eager"), ("gpt2", "eager"), ("qwen2", "eager"),
                                                   ("olmo2", "eager")])
def test_packed_attention_delegates_to_either_implementation(family, implementation, model_dirs):
    """The packed pass calls the model's own attention function: eager (the modeling file's) here, sdpa in
    the tests above (Gemma 2 runs eager there)."""
    from experiments.pipeline import LMPipeline

    pipeline = LMPipeline(str(model_dirs[family]), max_new_tokens=2, device="cpu")
    pipeline.model.set_attn_implementation(implementation)
    assert pipeline.config._attn_implementation == implementation
    cells = residual_cells(pipeline)
    base_fast, fast = run(pipeline, cells, True)
    base_slow, slow = run(pipeline, cells, False)
    assert base_fast == base_slow
    assert_same(fast, slow)
    assert pipeline.config._attn_implementation == implementation, "the packed pass restores the implementation"


def test_packed_pass_restores_attention_after_an_error(pipelines, monkeypatch):
    pipeline = pipelines["llama"]
    before = pipeline.config._attn_implementation
    reuse = SuffixReuse(pipeline)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(pipeline.model.model.layers[0].mlp), "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run(pipeline, residual_cells(pipeline)[:4], True)
    assert pipeline.config._attn_implementation == before
    assert reuse.supports(4) is None


def test_packed_attention_outside_a_pass_is_refused(pipelines):
    from experiments.backends.suffix_reuse import packed_attention

    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="outside a suffix-reuse pass"):
        packed_attention(pipelines["llama"].model.model.layers[0].self_attn, q, q, q, None)


def test_fast_path_declines_gpt2_reordered_eager_attention(model_dirs):
    from experiments.pipeline import LMPipeline

    pipeline = LMPipeline(str(model_dirs["gpt2"]), device="cpu")
    pipeline.model.set_attn_implementation("eager")
    pipeline.config.reorder_and_upcast_attn = True
    assert "bypasses the attention registry" in SuffixReuse(pipeline).supports(4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rows_split_over_several_layer_calls_match(family, pipelines, monkeypatch):
    """With a tiny token budget per layer call (rows spread over many calls) the results are unchanged."""
    import experiments.backends.suffix_reuse as suffix_reuse

    pipeline = pipelines[family]
    cells = residual_cells(pipeline)
    _, whole = run(pipeline, cells, True, max_new_tokens=2)
    monkeypatch.setattr(suffix_reuse, "PACKED_TOKENS_PER_CALL", (5, 5))
    _, chunked = run(pipeline, cells, True, max_new_tokens=2)
    _, slow = run(pipeline, cells, False, max_new_tokens=2)
    assert_same(chunked, slow)
    assert_same(chunked, whole)


def test_row_chunks():
    from experiments.backends.suffix_reuse import _row_chunks

    assert _row_chunks([3, 3, 3, 10, 1], 6) == [(0, 2, 0, 6), (2, 3, 6, 9), (3, 4, 9, 19), (4, 5, 19, 20)]
    assert _row_chunks([], 6) == []
