"""Intervention kinds beside interchange, through the one engine: featurized interchange, zero and mean
ablation, attention block / transplant / Q-K scaling; each checked against an independent computation
or a law it must obey, on every architecture family (both backends where a backend is involved)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from conftest import FAMILIES
from experiments.backends.attention_control import RecordAttention, TransplantAttention, attention_control
from experiments.backends import BACKENDS
from experiments.featurizers import Featurizer, LinearFeaturizer
from experiments.engine.intervention_engine import Cell, InterventionEngine, group_cells
from experiments.engine.model_units import AttentionHead, AttentionOutput, AttentionPattern, MLPOutput, ResidualStream
from experiments.token_positions import TokenPosition, last_token_position
from hook_reference import RefUnit, assert_rows_match, reference_cell

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

BASES = [{"raw_input": s} for s in ("12+34=", "5+6=", "123+4=")]
SOURCES = [{"raw_input": s} for s in ("9+87=", "777+1=", "3+3=")]
SAME_LENGTH_SOURCES = [{"raw_input": s} for s in ("98+76=", "7+1=", "3+300=")]
EXAMPLES = [0, 1, 2]


def run(pipeline, cells, backend="hooks", sources=SOURCES, bases=BASES):
    engine = InterventionEngine(pipeline, backend)
    base_rows, rows = engine.run_part(bases, sources, EXAMPLES, group_cells(cells, 64))
    by_cell = defaultdict(list)
    for row in rows:
        by_cell[row["cell_id"]].append(row)
    return base_rows, dict(by_cell)


def assert_same(rows_a, rows_b, atol=1e-5, where=""):
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a["output_token_ids"] == b["output_token_ids"], where
        torch.testing.assert_close(torch.tensor(a["topk_logits"]), torch.tensor(b["topk_logits"]), atol=atol, rtol=0)


def random_rotation(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return q


# ---------------------------------------------------------------------------------------------- featurizers


def test_identity_round_trip_is_exact():
    x = torch.randn(3, 5, 7)
    f, e = Featurizer().featurize(x)
    assert torch.equal(Featurizer().inverse(f, e), x)


def test_linear_featurizer_round_trip_and_error_term():
    x = torch.randn(4, 16, dtype=torch.float64)
    basis = random_rotation(16)[:, :5].double()
    feat = LinearFeaturizer(basis, mean=torch.randn(16, dtype=torch.float64))
    f, e = feat.featurize(x)
    assert f.shape == (4, 5)
    torch.testing.assert_close(feat.inverse(f, e), x, atol=1e-12, rtol=0)
    assert feat.weights_sha256() and feat.weights_sha256() != LinearFeaturizer(basis * 2).weights_sha256()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_swapping_all_features_equals_a_full_interchange(backend, family, pipelines):
    pipeline = pipelines[family]
    pos = last_token_position(pipeline)
    rotation = LinearFeaturizer(random_rotation(pipeline.hidden_size), id="rotation")
    cells = [
        Cell("plain", [ResidualStream(0, pos)]),
        Cell("all", [_with(ResidualStream(0, pos), featurizer=rotation)]),
        Cell("none", [_with(ResidualStream(0, pos), featurizer=rotation, feature_indices=())]),
        Cell("half", [_with(ResidualStream(0, pos), featurizer=rotation,
                            feature_indices=tuple(range(pipeline.hidden_size // 2)))]),
    ]
    base_rows, rows = run(pipeline, cells, backend)
    assert_same(rows["all"], rows["plain"], where=f"{family} all features")
    assert_same(rows["none"], base_rows, where=f"{family} no features")
    assert any(a["topk_logits"][0] != b["topk_logits"][0] for a, b in zip(rows["half"], rows["plain"]))
    assert any(a["topk_logits"][0] != b["topk_logits"][0] for a, b in zip(rows["half"], base_rows))


def _with(unit, **changes):
    for key, value in changes.items():
        setattr(unit, key, value)
    unit.__post_init__()
    return unit


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_featurized_subset_swap_agrees_across_backends(family, pipelines):
    pipeline = pipelines[family]
    pos = last_token_position(pipeline)
    rotation = LinearFeaturizer(random_rotation(pipeline.hidden_size, seed=3), id="rotation")
    cell = lambda: Cell("half", [_with(ResidualStream(0, pos), featurizer=rotation, feature_indices=(0, 1, 2, 5))])  # noqa: E731
    _, hooks = run(pipeline, [cell()], "hooks")
    _, pyv = run(pipeline, [cell()], "pyvene")
    assert_same(hooks["half"], pyv["half"])


def test_featurizer_recorded_in_cell_spec(pipelines):
    pipeline = pipelines["llama"]
    rotation = LinearFeaturizer(random_rotation(pipeline.hidden_size), id="rotation")
    unit = _with(ResidualStream(0, last_token_position(pipeline)), featurizer=rotation, feature_indices=(1, 2))
    spec = Cell("c", [unit]).spec
    assert spec.units[0].featurizer_id == "rotation"
    assert spec.units[0].featurizer_sha256 == rotation.weights_sha256() != ""
    assert spec.units[0].feature_indices == [1, 2] and spec.kind == "interchange"


# ---------------------------------------------------------------------------------------------- ablation


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_ablation_equals_a_hook_zeroing_the_unit(backend, family, pipelines):
    """Zero-ablating a unit equals interchanging with a source whose activation there is zero: the
    independent hook reference with a zero source tensor."""
    pipeline = pipelines[family]
    pos = last_token_position(pipeline)
    units = {"head": AttentionHead(1, 1, pos), "mlp": MLPOutput(0, pos)}
    _, rows = run(pipeline, [Cell(n, [u], kind="zero_ablation") for n, u in units.items()], backend)
    import hook_reference as ref

    original = ref.collect
    try:
        ref.collect = lambda model, batch, us: [torch.zeros_like(t) for t in original(model, batch, us)]
        for name, unit in units.items():
            expected = reference_cell(pipeline, BASES, SOURCES, [(RefUnit(unit.layer, unit.component, unit.head), pos)])
            assert_rows_match(rows[name], expected, where=f"{backend}/{family}/{name}")
    finally:
        ref.collect = original


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_mean_ablation_with_the_base_own_value_changes_nothing(family, pipelines):
    """Mean over a reference set holding only the base itself = the base's own activation: no change."""
    pipeline = pipelines[family]
    pos = last_token_position(pipeline)
    one = [BASES[0]]
    from experiments.backends.hooks_backend import HooksBackend

    batch = pipeline.load(one)
    unit = ResidualStream(0, pos)
    value = HooksBackend(pipeline.model).collect([unit.site], batch.model_inputs())[unit.site][0, -1]
    engine = InterventionEngine(pipeline)
    base_rows, rows = engine.run_part(one, one, [0], [[Cell("mean", [unit], kind="mean_ablation", ablation_values=[value])]])
    assert_same(rows, base_rows)
    other = engine.run_part(one, one, [0], [[Cell("mean", [unit], kind="mean_ablation", ablation_values=[value * 0 + 3])]])[1]
    assert other[0]["topk_logits"][0] != base_rows[0]["topk_logits"][0]


def test_mean_ablation_needs_values(pipelines):
    with pytest.raises(ValueError, match="one ablation value per unit"):
        Cell("m", [ResidualStream(0, last_token_position(pipelines["llama"]))], kind="mean_ablation")


# ---------------------------------------------------------------------------------------------- attention kinds


@pytest.mark.parametrize("family", FAMILIES)
def test_transplanting_the_base_own_pattern_changes_nothing(family, pipelines):
    pipeline = pipelines[family]
    every = TokenPosition(lambda s: list(range(len(pipeline.tokenize_one(s)["input_ids"]))), pipeline, id="every")
    cells = [Cell(f"L{l}", [AttentionPattern(l, every)], kind="attention_transplant") for l in range(pipeline.num_layers)]
    base_rows, rows = run(pipeline, cells, sources=BASES)
    for name in rows:
        assert_same(rows[name], base_rows, where=f"{family}/{name}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_transplant_equals_running_with_the_source_probabilities(family, pipelines):
    """Same-length prompts: the engine's transplant of layer 1, head 2 at the last position equals a
    hand-built TransplantAttention of the recorded source probabilities."""
    pipeline = pipelines[family]
    pos = last_token_position(pipeline)
    _, rows = run(pipeline, [Cell("t", [AttentionPattern(1, pos, head=2)], kind="attention_transplant")],
                  sources=SAME_LENGTH_SOURCES)
    base, cf = pipeline.load(BASES), pipeline.load(SAME_LENGTH_SOURCES)
    assert base.pad_offsets == cf.pad_offsets
    with attention_control(pipeline.model, [RecordAttention([1])]) as control:
        pipeline.model.base_model(**cf.model_inputs(), use_cache=False)
    probs = control.get(1).probs[:, 2:3, -1:, :]  # (B, 1, 1, T)
    width = base.input_ids.shape[1]
    op = TransplantAttention(1, [2], torch.arange(3), torch.full((3, 1), width - 1), probs, coordinates="cache")
    with attention_control(pipeline.model, [op]):
        expected = pipeline.output_rows(pipeline.greedy_decode(base, lambda inputs: pipeline.model(**inputs)), EXAMPLES)
    assert_same(rows["t"], expected)
    assert any(r["topk_logits"][0] != e["topk_logits"][0]
               for r, e in zip(rows["t"], pipeline.output_rows(pipeline.generate(BASES), EXAMPLES)))


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_block_and_scale_laws(family, pipelines):
    pipeline = pipelines[family]
    first = TokenPosition(lambda s: [1], pipeline, id="first_digit")
    every = TokenPosition(lambda s: list(range(len(pipeline.tokenize_one(s)["input_ids"]))), pipeline, id="every")
    cells = [
        Cell("block", [AttentionPattern(l, first) for l in range(pipeline.num_layers)], kind="attention_block"),
        Cell("scale1", [AttentionPattern(1, every, head=1)], kind="qk_scale", parameters={"target": "query", "factor": 1.0}),
        Cell("q3", [AttentionPattern(1, every, head=1)], kind="qk_scale",
             parameters={"target": "query", "factor": 3.0, "all_positions": True}),
        Cell("k3", [AttentionPattern(1, every, head=1)], kind="qk_scale",
             parameters={"target": "key", "factor": 3.0, "all_positions": True}),
        # no head: every head of the layer, as the other attention kinds
        Cell("q_all", [AttentionPattern(1, every)], kind="qk_scale",
             parameters={"target": "query", "factor": 3.0, "all_positions": True}),
        Cell("k_all", [AttentionPattern(1, every)], kind="qk_scale",
             parameters={"target": "key", "factor": 3.0, "all_positions": True}),
    ]
    base_rows, rows = run(pipeline, cells)
    assert_same(rows["scale1"], base_rows)
    assert_same(rows["q3"], rows["k3"])
    assert_same(rows["q_all"], rows["k_all"])
    assert any(a["topk_logits"][0] != b["topk_logits"][0] for a, b in zip(rows["q_all"], rows["q3"]))
    assert any(a["topk_logits"][0] != b["topk_logits"][0] for a, b in zip(rows["q3"], base_rows))
    assert any(a["topk_logits"][0] != b["topk_logits"][0] for a, b in zip(rows["block"], base_rows))


def test_attention_kinds_need_attention_units(pipelines):
    pos = last_token_position(pipelines["llama"])
    with pytest.raises(ValueError, match="attention_pattern"):
        Cell("x", [ResidualStream(0, pos)], kind="attention_block")
    with pytest.raises(ValueError, match="activation"):
        Cell("x", [AttentionPattern(0, pos)], kind="interchange")
    with pytest.raises(ValueError, match="target"):
        Cell("x", [AttentionPattern(0, pos, head=0)], kind="qk_scale", parameters={"factor": 2.0})
    with pytest.raises(ValueError, match="unknown intervention kind"):
        Cell("x", [ResidualStream(0, pos)], kind="steer")


def test_a_part_tokenises_each_prompt_once(model_dirs):
    """Token positions ask for every prompt once per position and side; the pipeline tokenises it once."""
    from experiments.pipeline import LMPipeline

    pipeline = LMPipeline(str(model_dirs["llama"]), max_new_tokens=1, device="cpu")
    positions = [TokenPosition(lambda s, i=i: [i], pipeline, id=f"p{i}") for i in range(4)] + [last_token_position(pipeline)]
    calls = []
    original = type(pipeline.tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            calls.append(text)
        return original(self, text, *args, **kwargs)

    type(pipeline.tokenizer).__call__ = counting
    try:
        cells = [Cell(f"c{p.id}", [ResidualStream(0, p)]) for p in positions]
        InterventionEngine(pipeline).run_part(BASES, SOURCES, EXAMPLES, group_cells(cells, 64))
    finally:
        type(pipeline.tokenizer).__call__ = original
    assert sorted(calls) == sorted(p["raw_input"] for p in BASES + SOURCES)


def test_addition_task_record():
    from experiments.task import get_task, known_tasks

    task = get_task("general_addition")
    settings = task.settings(digits=3)
    assert list(task.causal_models(settings)) == ["carry", "tens_no_carry"]
    assert task.main_model(settings).id == task.causal_models(settings)["carry"].id
    assert task.default_targets(settings, ["addend_0", "addend_1", "last"])[0] == ["digit_0_2", "digit_0_1", "digit_0_0"]
    data = task.make_datasets(settings, ["random"], 4, 0)
    assert list(data) == ["random"] and len(data["random"]) == 4
    assert task.organism is not None and (task.organism / "config.json").exists()
    assert "general_addition" in known_tasks()
    with pytest.raises(ValueError, match="unknown task"):
        get_task("no_such_task")


def test_kinds_sharing_a_position_read_their_own_sides(pipelines):
    """An ablation cell and an interchange cell at one position: the interchange still reads the
    counterfactual's own token (the source columns do not depend on which cell came first)."""
    pipeline = pipelines["llama"]
    second = TokenPosition(lambda s: [s["raw_input"].index("+") + 2], pipeline, id="second_operand")
    bases = [{"raw_input": s} for s in ("1+2=", "3+4=", "5+6=")]
    sources = [{"raw_input": s} for s in ("999+87=", "77+1=", "123+4=")]
    _, alone = run(pipeline, [Cell("ic", [ResidualStream(0, second)])], bases=bases, sources=sources)
    _, mixed = run(pipeline, [Cell("za", [ResidualStream(0, second)], kind="zero_ablation"),
                              Cell("ic", [ResidualStream(0, second)])], bases=bases, sources=sources)
    assert_same(mixed["ic"], alone["ic"])


def test_transplanted_attention_stays_causal(pipelines, monkeypatch):
    """Prompts of different lengths: aligned source probabilities never put mass on a key after the query."""
    import experiments.engine.intervention_engine as engine_module

    captured = []
    original = engine_module.TransplantAttention

    def capture(*args, **kwargs):
        op = original(*args, **kwargs)
        captured.append(op)
        return op

    monkeypatch.setattr(engine_module, "TransplantAttention", capture)
    pipeline = pipelines["llama"]
    plus = TokenPosition(lambda s: [s["raw_input"].index("+") + 1], pipeline, id="plus")
    run(pipeline, [Cell("t", [AttentionPattern(1, plus)], kind="attention_transplant")],
        bases=[{"raw_input": "12+34="}, {"raw_input": "5+6="}, {"raw_input": "123+4="}],
        sources=[{"raw_input": "777+1="}, {"raw_input": "3+300="}, {"raw_input": "9+8="}])
    (op,) = captured
    for r in range(op.probs.shape[0]):
        for j, q in enumerate(op.query_positions[r].tolist()):
            if q < 0:
                continue
            row = op.probs[r, :, j]  # (heads, K)
            assert float(row[:, q + 1:].abs().sum()) == 0.0
            torch.testing.assert_close(row.sum(-1), torch.ones(row.shape[0]), atol=1e-5, rtol=0)


def test_bad_kind_parameters_are_refused(pipelines):
    pipeline = pipelines["llama"]
    pos = last_token_position(pipeline)
    with pytest.raises(ValueError, match="needs parameters target"):
        Cell("q", [AttentionPattern(0, pos)], kind="qk_scale", parameters={"target": "value", "factor": 2.0})
    rotation = LinearFeaturizer(random_rotation(pipeline.hidden_size), id="rotation")
    for bad in ((-1,), (0, 0), (pipeline.hidden_size,)):
        cell = Cell("f", [_with(ResidualStream(0, pos), featurizer=rotation, feature_indices=bad)])
        with pytest.raises(ValueError, match="feature indices"):
            run(pipeline, [cell])
    wrong = Cell("m", [ResidualStream(0, pos)], kind="mean_ablation", ablation_values=[torch.zeros(5)])
    with pytest.raises(ValueError, match="mean-ablation value"):
        run(pipeline, [wrong])


# ---------------------------------------------------------------------------------------------- packed sites


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sites_share_forwards_and_match_the_independent_reference(family, pipelines):
    """With pack_sites, cells of different sites and kinds run in shared forwards (each patch on its own rows):
    fewer prompt passes, and every cell still equals the independent hook reference (unpacked forwards)."""
    from experiments.backends import make_backend
    from experiments.engine.model_units import AttentionOutput

    pipeline = pipelines[family]
    pos = last_token_position(pipeline)
    first = TokenPosition(lambda s: [1], pipeline, id="first_digit")
    units = {"resid": ResidualStream(0, first), "attn": AttentionOutput(1, pos), "mlp": MLPOutput(0, pos),
             "head": AttentionHead(1, 1, pos), "head0": AttentionHead(0, 0, first)}
    cells = [Cell(name, [unit]) for name, unit in units.items()]
    cells.append(Cell("zero", [MLPOutput(1, first)], kind="zero_ablation"))
    passes = {}
    for pack in (False, True):
        backend = make_backend("hooks", pipeline.model)
        calls = []
        prompt_pass = backend.prompt_pass
        backend.prompt_pass = lambda inputs, patches: calls.append(len(patches)) or prompt_pass(inputs, patches)
        engine = InterventionEngine(pipeline, backend, suffix_reuse=False, pack_sites=pack)
        _, got = engine.run_part(BASES, SOURCES, EXAMPLES, group_cells(cells, 64))
        by_cell = defaultdict(list)
        for row in got:
            by_cell[row["cell_id"]].append(row)
        passes[pack] = calls
        for name, unit in units.items():
            expected = reference_cell(pipeline, BASES, SOURCES, [(RefUnit(unit.layer, unit.component, unit.head), unit.position)])
            assert_rows_match(by_cell[name], expected, where=f"{family}/{name}/pack={pack}")
        if pack:
            packed_rows = by_cell
        else:
            unpacked_rows = by_cell
    assert len(passes[False]) == len(cells) and len(passes[True]) == 1 and passes[True][0] == len(cells)
    assert_same(packed_rows["zero"], unpacked_rows["zero"], where=f"{family} zero ablation")


def test_cells_pack_where_the_fast_path_does_not_apply(pipelines, monkeypatch):
    """A part the suffix fast path declines (here: forced) still packs its site cells under pack_sites: one prompt
    pass for four in-layer sites."""
    pipeline = pipelines["llama"]
    pos = last_token_position(pipeline)
    cells = [Cell(f"{kind}{layer}", [unit(layer, pos)]) for layer in range(2)
             for kind, unit in (("attn", AttentionOutput), ("mlp", MLPOutput))]
    engine = InterventionEngine(pipeline, "hooks", pack_sites=True)
    monkeypatch.setattr(engine.suffix, "supports", lambda width: "declined for the test")
    calls = []
    prompt_pass = engine.backend.prompt_pass
    monkeypatch.setattr(engine.backend, "prompt_pass",
                        lambda inputs, patches: calls.append(len(patches)) or prompt_pass(inputs, patches))
    engine.run_part(BASES, SOURCES, EXAMPLES, group_cells(cells, 64))
    assert calls == [4]


def test_packing_needs_a_backend_with_row_patches(pipelines):
    with pytest.raises(ValueError, match="row patches"):
        InterventionEngine(pipelines["llama"], "pyvene", pack_sites=True)
