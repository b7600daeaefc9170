"""The intervention engine on five architectures, checked against an independent plain-hook reference.

For GPT-2, Llama (GQA), Gemma 2 (heads x head_dim != hidden), OLMo 2 and Qwen 2 (GQA), every unit
kind is patched on a left-padded batch whose bases and counterfactuals have different lengths, and
the engine's outputs (greedy ids, top-k logits per step) must equal ``tests/hook_reference.py``.
Each known pitfall of pyvene 0.1.8 on transformers 5 gets a guard test (``test_trap*``): configs without
``head_dim``, Gemma 2 head width, the unregistered OLMo 2 class, attention weights, multi-position units.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from pyvene.models import intervenable_modelcard as modelcard

from conftest import FAMILIES
from experiments.backends import BACKENDS
from experiments.engine.intervention_engine import Cell, InterventionEngine, group_cells
from experiments.engine.intervention_experiment import PatchAttentionHeads, PatchResidualStream, PatchUnits
from experiments.engine.model_units import (
    AttentionHead,
    AttentionOutput,
    MLPOutput,
    ModelUnit,
    ResidualStream,
    UnitError,
)
from experiments.pipeline import LMPipeline
from experiments.backends.architectures import head_width
from experiments.token_positions import TokenPosition, last_token_position
from hook_reference import RefUnit, assert_rows_match, reference_cell

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

BASES = [{"raw_input": s} for s in ("12+34=", "5+6=", "123+4=")]
COUNTERFACTUALS = [{"raw_input": s} for s in ("9+87=", "777+1=", "3+3=")]
EXAMPLES = [0, 1, 2]


def positions(pipeline: LMPipeline) -> dict[str, TokenPosition]:
    return {
        "last": last_token_position(pipeline),
        "first_digit": TokenPosition(lambda s: [1], pipeline, id="first_digit"),
        "last_two": TokenPosition(lambda s: [-2, -1], pipeline, id="last_two"),
    }


def cell_units(pipeline: LMPipeline) -> dict[str, list[ModelUnit]]:
    """Cell name -> units patched together. Covers every unit kind the framework exposes."""
    L, H = pipeline.num_layers, pipeline.num_heads
    p = positions(pipeline)
    return {
        "resid_embeddings": [ResidualStream(-1, p["first_digit"])],
        "resid_layer0": [ResidualStream(0, p["last"])],
        "resid_layer0_first_digit": [ResidualStream(0, p["first_digit"])],
        "resid_last_layer": [ResidualStream(L - 1, p["last"])],
        "block_input_last_layer": [ResidualStream(L - 1, p["last"], component="block_input")],
        "attention_output": [AttentionOutput(0, p["last"])],
        "mlp_output": [MLPOutput(0, p["last"])],
        "head_first": [AttentionHead(0, 0, p["last"])],
        "head_last": [AttentionHead(L - 1, H - 1, p["last"])],
        "resid_last_layer_two_positions": [ResidualStream(L - 1, p["last_two"])],
        "head_two_positions": [AttentionHead(0, H - 1, p["last_two"])],
        "heads_two_layers": [AttentionHead(0, 0, p["last"]), AttentionHead(L - 1, 1, p["last"])],
        "heads_same_layer": [AttentionHead(0, 0, p["last"]), AttentionHead(0, 1, p["last"])],
    }


CELL_NAMES = [
    "resid_embeddings", "resid_layer0", "resid_layer0_first_digit", "resid_last_layer", "block_input_last_layer",
    "attention_output", "mlp_output", "head_first", "head_last", "resid_last_layer_two_positions",
    "head_two_positions", "heads_two_layers", "heads_same_layer",
]


def ref_units(units: list[ModelUnit]):
    return [(RefUnit(u.layer, u.component, u.head), u.position) for u in units]


def run_engine(pipeline: LMPipeline, cells: list[Cell], cells_per_forward: int = 64, backend: str = "hooks"):
    """Engine rows per cell id (in example order) and the base rows."""
    engine = InterventionEngine(pipeline, backend)
    base_rows, rows = engine.run_part(BASES, COUNTERFACTUALS, EXAMPLES, group_cells(cells, cells_per_forward))
    by_cell = defaultdict(list)
    for row in rows:
        by_cell[row["cell_id"]].append(row)
    return base_rows, dict(by_cell)


@pytest.fixture(scope="module")
def engine_runs(pipelines):
    """(family, backend) -> (base rows, {cell name: rows}, {cell name: units}); one engine pass each."""
    cache = {}

    def get(family: str, backend: str = "hooks"):
        if (family, backend) not in cache:
            pipeline = pipelines[family]
            units = cell_units(pipeline)
            base_rows, rows = run_engine(pipeline, [Cell(name, us) for name, us in units.items()], backend=backend)
            cache[family, backend] = (base_rows, rows, units)
        return cache[family, backend]

    return get


def test_cell_names_cover_all_cells(pipelines):
    assert list(cell_units(pipelines["llama"])) == CELL_NAMES


@pytest.mark.parametrize("cell_name", CELL_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_matches_hook_reference(backend, family, cell_name, pipelines, engine_runs):
    pipeline = pipelines[family]
    _, rows, units = engine_runs(family, backend)
    ref = reference_cell(pipeline, BASES, COUNTERFACTUALS, ref_units(units[cell_name]))
    assert [r["example_index"] for r in rows[cell_name]] == EXAMPLES
    assert_rows_match(rows[cell_name], ref, where=f"{backend}/{family}/{cell_name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_backends_agree_with_each_other(family, engine_runs):
    """hooks and pyvene: generated ids identical, top-k logits within 1e-5, for every cell."""
    base_h, rows_h, _ = engine_runs(family, "hooks")
    base_p, rows_p, _ = engine_runs(family, "pyvene")
    assert [r["output_token_ids"] for r in base_h] == [r["output_token_ids"] for r in base_p]
    for name in CELL_NAMES:
        for a, b in zip(rows_h[name], rows_p[name]):
            assert a["output_token_ids"] == b["output_token_ids"], f"{family}/{name}"
            assert a["topk_token_ids"] == b["topk_token_ids"], f"{family}/{name}"
            torch.testing.assert_close(torch.tensor(a["topk_logits"]), torch.tensor(b["topk_logits"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_base_rows_are_the_unpatched_generation(family, pipelines, engine_runs):
    pipeline = pipelines[family]
    base_rows, _, _ = engine_runs(family)
    ref = reference_cell(pipeline, BASES, COUNTERFACTUALS, [])
    assert_rows_match(base_rows, ref, where=f"{family}/base")


def _differs(rows, base_rows) -> list[bool]:
    return [
        r["output_token_ids"] != b["output_token_ids"]
        or not torch.allclose(torch.tensor(r["topk_logits"][0]), torch.tensor(b["topk_logits"][0]), atol=1e-4)
        for r, b in zip(rows, base_rows)
    ]


def test_patches_are_not_vacuous(engine_runs):
    """Random weights: every cell kind changes a generated token somewhere; the residual stream
    (embeddings, layer 0, last layer) changes the logits of every example in every family."""
    token_changed = defaultdict(bool)
    for family in FAMILIES:
        base_rows, rows, _ = engine_runs(family)
        for name in CELL_NAMES:
            token_changed[name] |= any(r["output_token_ids"] != b["output_token_ids"] for r, b in zip(rows[name], base_rows))
        for name in ("resid_embeddings", "resid_layer0", "resid_last_layer"):
            assert all(_differs(rows[name], base_rows)), f"{family}/{name} left some output unchanged"
        assert any(r["output_token_ids"] != b["output_token_ids"] for r, b in zip(rows["resid_last_layer"], base_rows))
    never = [name for name in CELL_NAMES if not token_changed[name]]
    assert not never, f"cells that never changed a generated token: {never}"


# ---------------------------------------------------------------------------------------------- traps


def _fresh_pipeline(model_dirs, family: str) -> LMPipeline:
    return LMPipeline(str(model_dirs[family]), max_new_tokens=3, device="cpu")


@pytest.mark.parametrize("family", ["qwen2", "olmo2"])
def test_trap1_head_units_without_config_head_dim(family, model_dirs):
    """Qwen2 / OLMo 2 transformers-5 configs have no ``head_dim``; pyvene 0.1.8 head components crashed on it."""
    pipeline = _fresh_pipeline(model_dirs, family)
    assert getattr(pipeline.config, "head_dim", None) is None, "fixture no longer exercises the trap"
    units = [AttentionHead(0, 1, last_token_position(pipeline))]
    _, rows = run_engine(pipeline, [Cell("h", units)])
    assert_rows_match(rows["h"], reference_cell(pipeline, BASES, COUNTERFACTUALS, ref_units(units)), where=family)
    assert getattr(pipeline.config, "head_dim", None) is None, "the backend must not leave its head_dim fix behind"


def test_trap2_gemma2_head_patch_covers_full_head_width(pipelines):
    """Gemma 2 here: head_dim=32 while hidden/heads=16. The patch must cover all 32 dims of the head."""
    pipeline = pipelines["gemma2"]
    assert head_width(pipeline.model) == 32 != pipeline.hidden_size // pipeline.num_heads
    pos = last_token_position(pipeline)
    for layer, head in [(0, 0), (1, 3)]:
        units = [AttentionHead(layer, head, pos)]
        _, rows = run_engine(pipeline, [Cell("h", units)])
        full = reference_cell(pipeline, BASES, COUNTERFACTUALS, ref_units(units))
        assert_rows_match(rows["h"], full, where=f"gemma2 L{layer}H{head}")
        # discriminating: a patch of only the first hidden/heads dims would give other logits
        half = _half_head_reference(pipeline, layer, head)
        assert not torch.allclose(full.step_logits[0], half, atol=1e-4)


def _half_head_reference(pipeline: LMPipeline, layer: int, head: int) -> torch.Tensor:
    """First-step logits when only the first hidden/heads dims of the head are patched (the pyvene-config width)."""
    import hook_reference as hr

    narrow = pipeline.hidden_size // pipeline.num_heads
    model = pipeline.model
    base_batch, cf_batch = pipeline.load(BASES), pipeline.load(COUNTERFACTUALS)
    unit = RefUnit(layer, "head_attention_value_output", head)
    source = hr.collect(model, cf_batch, [unit])[0][..., :narrow]
    module, _ = hr.module_and_side(model, unit)
    start = head * hr.head_dim_from_weights(model)

    def pre(_mod, args):
        t = args[0].clone()
        t[:, -1, start : start + narrow] = source[:, -1]
        return (t, *args[1:])

    handle = module.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            out = model(**base_batch.model_inputs())
    finally:
        handle.remove()
    return out.logits[:, -1].float()


def test_trap4_olmo2_unregistered_class_is_registered(model_dirs, monkeypatch):
    """pyvene 0.1.8's exact-type registry lacks OLMo 2; the backend registers it (Llama-like layout)."""
    pipeline = _fresh_pipeline(model_dirs, "olmo2")
    cls = type(pipeline.model)
    monkeypatch.delitem(modelcard.type_to_module_mapping, cls, raising=False)
    monkeypatch.delitem(modelcard.type_to_dimension_mapping, cls, raising=False)
    pos = last_token_position(pipeline)
    units = {"resid": [ResidualStream(0, pos)], "mlp": [MLPOutput(1, pos)], "head": [AttentionHead(1, 2, pos)]}
    _, rows = run_engine(pipeline, [Cell(n, us) for n, us in units.items()], backend="pyvene")
    assert cls in modelcard.type_to_module_mapping
    for name, us in units.items():
        assert_rows_match(rows[name], reference_cell(pipeline, BASES, COUNTERFACTUALS, ref_units(us)), where=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_trap5_multi_position_unit_patches_every_position(family, pipelines, engine_runs):
    """A unit over the last TWO tokens of the last layer: the final position must be patched too.

    (pyvene, left to itself, patches only the first position of a multi-position unit.) Patching the
    last layer's output at the final token makes the first-step logits exactly the counterfactual's own.
    """
    base_rows, rows, _ = engine_runs(family)
    cf_rows = pipelines[family].output_rows(pipelines[family].generate(COUNTERFACTUALS), EXAMPLES)
    for row, cf, base in zip(rows["resid_last_layer_two_positions"], cf_rows, base_rows):
        assert row["topk_token_ids"][0] == cf["topk_token_ids"][0]
        torch.testing.assert_close(torch.tensor(row["topk_logits"][0]), torch.tensor(cf["topk_logits"][0]),
                                   atol=1e-5, rtol=0)
        assert row["topk_logits"][0] != base["topk_logits"][0]


def test_trap3_attention_weight_component_is_not_offered(pipelines):
    """pyvene's ``attention_weight`` hooks a module that transformers 5's attention path never calls
    (and exists only for GPT-2), so an interchange there would silently do nothing. The framework
    therefore refuses the component outright instead of producing no-op results."""
    pos = last_token_position(pipelines["gpt2"])
    with pytest.raises(UnitError, match="attention_weight"):
        ModelUnit(0, "attention_weight", pos)
    with pytest.raises(UnitError):
        ModelUnit(0, "attention_weight", pos, head=0)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_out_of_range_units_raise(family, pipelines):
    pipeline = pipelines[family]
    L, H = pipeline.num_layers, pipeline.num_heads
    pos = last_token_position(pipeline)
    for unit in (ResidualStream(L, pos), ResidualStream(-2, pos), AttentionOutput(L, pos), MLPOutput(-1, pos),
                 ResidualStream(-1, pos, component="block_input")):
        with pytest.raises(UnitError, match=rf"layer {unit.layer} is out of range .*{L}-layer model"):
            unit.validate(pipeline)
    for head in (H, -1):
        with pytest.raises(UnitError, match=rf"head {head} is out of range.*{H} attention heads"):
            AttentionHead(0, head, pos).validate(pipeline)
    with pytest.raises(UnitError, match="head index is required"):
        ModelUnit(0, "head_attention_value_output", pos)
    with pytest.raises(UnitError, match="head index is required"):
        ModelUnit(0, "block_output", pos, head=0)


def test_experiments_validate_units_at_construction(pipelines):
    pipeline = pipelines["llama"]
    L, H = pipeline.num_layers, pipeline.num_heads
    pos = last_token_position(pipeline)
    with pytest.raises(UnitError, match="out of range"):
        PatchResidualStream(pipeline, layers=[-1, 0, L], token_positions=[pos])
    with pytest.raises(UnitError, match="out of range"):
        PatchResidualStream(pipeline, layers=[-2], token_positions=[pos])
    with pytest.raises(UnitError, match="out of range"):
        PatchUnits(pipeline, layers=[L], token_positions=[pos], component="mlp_output")
    with pytest.raises(UnitError, match="head .* out of range"):
        PatchAttentionHeads(pipeline, [[(0, 0), (1, H)]], [pos])
    with pytest.raises(UnitError, match="layer .* out of range"):
        PatchAttentionHeads(pipeline, [[(L, 0)]], [pos])
    with pytest.raises(UnitError, match="unknown component"):
        PatchUnits(pipeline, layers=[0], token_positions=[pos], component="attention_weight")
