"""Smoke tests on the published shapes of Llama-3.2-1B, Qwen2.5-0.5B, Gemma-2-2B, OLMo-2-0425-1B and GPT-2 small.

Random-weight models built from each model's published ``config.json`` (``tests/real_shapes.py``: real
hidden / intermediate sizes, heads, key/value heads, head_dim, rope, norms, softcapping, sliding window,
biases, tying), cut to 2 layers; nothing is downloaded. For each shape:

- the built model has the published shapes (a guard that the config reached the modules);
- a residual-stream sweep and an attention-head sweep match the independent hook reference
  (``tests/hook_reference.py``) on both backends, and the backends agree with each other;
- attention-level kinds (block / transplant / Q-K scale) agree across backends and obey their laws;
  a transplant equals a hand-built ``TransplantAttention`` of the recorded source probabilities;
- the suffix-reuse fast path equals the plain path (token ids equal, logits within 1e-4 relative);
- with the real vocabulary (slow): every path agrees, and the first-step logits are the model's own.

The vocabulary is cut to ``real_shapes.CUT_VOCAB`` (4096) in the reference tests (not GPT-2's: cheap,
kept) because the hook reference projects every position onto it; see ``tests/real_shapes.py``.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch

from conftest import make_tokenizer
from experiments.backends.architectures import head_width
from experiments.backends.attention_control import RecordAttention, TransplantAttention, attention_control
from experiments.backends import BACKENDS
from experiments.engine.intervention_engine import Cell, InterventionEngine, group_cells
from experiments.engine.intervention_experiment import PatchAttentionHeads, PatchResidualStream
from experiments.engine.model_units import AttentionHead, AttentionPattern, ModelUnit, ResidualStream
from experiments.pipeline import LMPipeline
from experiments.backends.suffix_reuse import SuffixReuse
from experiments.token_positions import TokenPosition, last_token_position
from hook_reference import RefUnit, assert_rows_match, reference_cell
from real_shapes import CUT_VOCAB, SHAPES, Shape, build_model

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

# 4 pairs of different lengths (left padding differs per row)
BASES = [{"raw_input": s} for s in ("12+34=", "5+6=", "123+4=", "7+70=")]
SOURCES = [{"raw_input": s} for s in ("9+87=", "777+1=", "3+3=", "45+5=")]
SAME_LENGTH_SOURCES = [{"raw_input": s} for s in ("98+76=", "7+1=", "3+300=", "4+55=")]  # token for token as BASES
EXAMPLES = [0, 1, 2, 3]
MAX_NEW_TOKENS = 2  # the prompt pass and one decoding step from its cache (the reference reruns the prompt per step)
RTOL = 1e-4  # logits: relative to the step's logit scale (see ``logit_atol``)


@dataclass
class Real:
    shape: Shape
    pipeline: LMPipeline


#: intra-op threads while a real shape runs: one, as conftest sets (on a shared 2-core machine two threads ran the
#: real widths' matmuls slower than one, measured under the load of a parallel test run)
THREADS = 1


def make_pipeline(shape: Shape, real_vocab: bool = False) -> LMPipeline:
    tokenizer = make_tokenizer()
    return LMPipeline(build_model(shape, tokenizer, real_vocab), tokenizer=tokenizer,
                      max_new_tokens=MAX_NEW_TOKENS, device="cpu")


#: shapes whose sweeps take more than a few seconds each (4-7 s on the 2-core machine: 2048-2304 wide, 8192-9216
#: MLPs); their sweeps are marked slow. GPT-2 small and Qwen2.5-0.5B run every test in under 3 s.
HEAVY = ("llama-3.2-1b", "gemma-2-2b", "olmo-2-0425-1b")
EVERY_SHAPE = pytest.mark.parametrize("real", list(SHAPES), indirect=True)
SWEEP_SHAPES = pytest.mark.parametrize(
    "real", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in SHAPES], indirect=True)


@pytest.fixture(scope="module")
def real(request):
    """One shape at a time (module-scoped parameter: pytest groups the tests by shape, so one model is alive)."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    shape = SHAPES[request.param]
    yield Real(shape, make_pipeline(shape))
    torch.set_num_threads(before)
    gc.collect()


# ---------------------------------------------------------------------------------------------- helpers


def run(pipeline, cells, backend="hooks", suffix_reuse=True, bases=BASES, sources=SOURCES):
    engine = InterventionEngine(pipeline, backend, suffix_reuse=suffix_reuse)
    base_rows, rows = engine.run_part(bases, sources, EXAMPLES, group_cells(cells, 64))
    by_cell = defaultdict(list)
    for row in rows:
        by_cell[row["cell_id"]].append(row)
    return base_rows, dict(by_cell)


def logit_atol(rows) -> float:
    """``RTOL`` of the largest logit magnitude of the rows (at least ``RTOL``): float32 rounding grows with it."""
    scale = max((abs(v) for r in rows for step in r["topk_logits"] for v in step), default=1.0)
    return RTOL * max(1.0, scale)


def assert_same(rows_a, rows_b, where=""):
    """Same generated ids; top-k logits within ``RTOL`` relative (order-robust: sorted values)."""
    assert len(rows_a) == len(rows_b), where
    atol = logit_atol(rows_b)
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a["example_index"] == b["example_index"], where
        assert a["output_token_ids"] == b["output_token_ids"], f"{where} example {a['example_index']}"
        torch.testing.assert_close(torch.tensor(a["topk_logits"]), torch.tensor(b["topk_logits"]),
                                   rtol=RTOL, atol=atol, msg=lambda m: f"{where} example {a['example_index']}: {m}")


def assert_cells_same(cells_a, cells_b, where=""):
    assert cells_a.keys() == cells_b.keys(), where
    for cell_id in cells_b:
        assert_same(cells_a[cell_id], cells_b[cell_id], where=f"{where} {cell_id}")


def ref_units(units: list[ModelUnit]):
    return [(RefUnit(u.layer, u.component, u.head), u.position) for u in units]


def assert_matches_reference(pipeline, runs, units_of, bases=BASES, sources=SOURCES):
    """Every run's rows of every cell equal the hook reference (computed once per cell)."""
    for name, units in units_of.items():
        ref = reference_cell(pipeline, bases, sources, ref_units(units))
        for run_name, (_, rows) in runs.items():
            assert [r["example_index"] for r in rows[name]] == EXAMPLES
            assert_rows_match(rows[name], ref, atol=logit_atol(rows[name]), where=f"{run_name}/{name}")


def first_step_changed(rows, base_rows) -> list[bool]:
    return [not torch.allclose(torch.tensor(r["topk_logits"][0]), torch.tensor(b["topk_logits"][0]),
                               rtol=RTOL, atol=logit_atol([b]))
            or r["topk_token_ids"][0] != b["topk_token_ids"][0]
            for r, b in zip(rows, base_rows)]


def every_token(pipeline) -> TokenPosition:
    return TokenPosition(lambda s: list(range(len(pipeline.tokenize_one(s)["input_ids"]))), pipeline, id="every")


def _norm_eps(norm) -> float | None:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    return None


# ---------------------------------------------------------------------------------------------- shapes


@EVERY_SHAPE
def test_built_model_has_the_published_shape(real):
    """The published numbers reach the modules (and the two-layer cut keeps them)."""
    shape, pipeline = real.shape, real.pipeline
    model, config = pipeline.model, pipeline.config
    assert pipeline.num_layers == 2
    assert pipeline.hidden_size == shape.hidden
    assert (pipeline.num_heads, pipeline.num_kv_heads) == (shape.heads, shape.kv_heads)
    assert head_width(model) == shape.head_dim
    vocab = shape.config["vocab_size"] if shape.keep_real_vocab else CUT_VOCAB
    assert model.get_input_embeddings().weight.shape == (vocab, shape.hidden)
    tied = shape.config.get("tie_word_embeddings", True)  # GPT-2 / Gemma 2: the config default (tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if config.model_type == "gpt2":
        block = model.transformer.h[0]
        assert block.attn.c_attn.weight.shape == (shape.hidden, 3 * q)
        assert block.mlp.c_fc.weight.shape == (shape.hidden, shape.intermediate)
        assert block.ln_1.eps == shape.config["layer_norm_epsilon"]
        return
    block = model.model.layers[0]
    attn, mlp = block.self_attn, block.mlp
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (q, kv, kv)
    assert attn.o_proj.in_features == q and attn.o_proj.out_features == shape.hidden
    assert mlp.up_proj.out_features == mlp.gate_proj.out_features == mlp.down_proj.in_features == shape.intermediate
    assert _norm_eps(model.model.norm) == shape.config["rms_norm_eps"]
    assert config.rope_parameters["rope_theta"] == shape.config["rope_theta"]
    has_bias = config.model_type == "qwen2"  # Qwen2: q/k/v bias, no o_proj bias; the others: no bias
    assert all((p.bias is not None) == has_bias for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.o_proj.bias is None
    if config.model_type == "llama":
        rope = config.rope_parameters
        assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
        assert (rope["low_freq_factor"], rope["high_freq_factor"]) == (1.0, 4.0)
        assert rope["original_max_position_embeddings"] == 8192
        default = 1.0 / (500000.0 ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim))
        inv_freq = model.model.rotary_emb.inv_freq.float()
        torch.testing.assert_close(inv_freq[0], default[0])  # high frequencies kept
        torch.testing.assert_close(inv_freq[-1], default[-1] / 32.0)  # low frequencies scaled by the factor
    if config.model_type == "gemma2":
        assert list(config.layer_types) == ["sliding_attention", "full_attention"]
        assert config.sliding_window == 4096 and config.query_pre_attn_scalar == 256
        assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
        assert attn.scaling == 256 ** -0.5
        assert q == 2048 != shape.hidden
    if config.model_type == "olmo2":
        assert attn.q_norm.weight.shape == (q,) and attn.k_norm.weight.shape == (kv,)
    if config.model_type == "qwen2":
        assert shape.heads // shape.kv_heads == 7 and getattr(config, "sliding_window", None) is None


# ---------------------------------------------------------------------------------------------- sweeps


@SWEEP_SHAPES
def test_residual_stream_sweep_matches_reference(real):
    """Embeddings and both layers' outputs at two positions: hooks (suffix reuse) and pyvene each equal the
    hook reference, base rows too, and agree with each other."""
    pipeline = real.pipeline
    positions = [last_token_position(pipeline), TokenPosition(lambda s: [1], pipeline, id="first_digit")]

    def cells():
        return PatchResidualStream(pipeline, list(range(-1, pipeline.num_layers)), positions).cells

    units_of = {c.cell_id: c.units for c in cells()}
    # hooks runs these cells on the suffix-reuse fast path (its plain path: test_suffix_reuse_equals_the_plain_path)
    runs = {"hooks": run(pipeline, cells()), "pyvene": run(pipeline, cells(), "pyvene")}
    base_ref = reference_cell(pipeline, BASES, SOURCES, [])
    for name, (base_rows, _) in runs.items():
        assert_rows_match(base_rows, base_ref, atol=logit_atol(base_rows), where=f"{name}/base")
    assert_matches_reference(pipeline, runs, units_of)
    assert_cells_same(runs["pyvene"][1], runs["hooks"][1], where="pyvene vs hooks")
    base_rows, rows = runs["hooks"]
    for name in ("L-1@first_digit", "L0@last", "L1@last"):  # (the last token is "=" on both sides)
        assert all(first_step_changed(rows[name], base_rows)), f"{name} left a first step unchanged"


@SWEEP_SHAPES
def test_attention_head_sweep_matches_reference(real):
    """Single heads at both ends and at a key/value-group boundary, two heads in two layers, a head over two
    positions: both backends equal the hook reference (full head_dim wide; Gemma 2: 256 != 2304 / 8)."""
    pipeline = real.pipeline
    H, KV = pipeline.num_heads, pipeline.num_kv_heads
    group = H // KV  # query heads per key/value head
    last = last_token_position(pipeline)
    last_two = TokenPosition(lambda s: [-2, -1], pipeline, id="last_two")
    head_lists = [[(0, 0)], [(0, H - 1)], [(1, group)], [(0, 1), (1, H - 1)]]

    def cells():
        exp = PatchAttentionHeads(pipeline, head_lists, [last])
        return exp.cells + [Cell(f"L0H{H - 1}@last_two", [AttentionHead(0, H - 1, last_two)])]

    units_of = {c.cell_id: c.units for c in cells()}
    runs = {backend: run(pipeline, cells(), backend) for backend in BACKENDS}
    assert_matches_reference(pipeline, runs, units_of)
    assert_cells_same(runs["pyvene"][1], runs["hooks"][1], where="pyvene vs hooks")
    base_rows, rows = runs["hooks"]
    assert any(any(first_step_changed(r, base_rows)) for r in rows.values()), "no head patch changed a logit"


@SWEEP_SHAPES
def test_attention_kinds_agree_and_obey_their_laws(real):
    """Block, transplant and Q/K scaling through the engine on both backends: identical rows; scaling by 1
    changes nothing, queries x 3 == keys x 3, blocking and scaling change the logits, transplanting the
    base's own pattern changes nothing."""
    pipeline = real.pipeline
    H = pipeline.num_heads
    first = TokenPosition(lambda s: [1], pipeline, id="first_digit")
    last = last_token_position(pipeline)
    every = every_token(pipeline)

    def cells():
        return [
            Cell("block", [AttentionPattern(l, first) for l in range(pipeline.num_layers)], kind="attention_block"),
            Cell("transplant_layer", [AttentionPattern(0, last)], kind="attention_transplant"),
            Cell("transplant_head", [AttentionPattern(1, last, head=H - 1)], kind="attention_transplant"),
            Cell("scale1", [AttentionPattern(1, every, head=1)], kind="qk_scale",
                 parameters={"target": "query", "factor": 1.0}),
            Cell("q3", [AttentionPattern(1, every, head=H - 1)], kind="qk_scale",
                 parameters={"target": "query", "factor": 3.0, "all_positions": True}),
            Cell("k3", [AttentionPattern(1, every, head=H - 1)], kind="qk_scale",
                 parameters={"target": "key", "factor": 3.0, "all_positions": True}),
        ]

    runs = {backend: run(pipeline, cells(), backend) for backend in BACKENDS}
    base_h, rows_h = runs["hooks"]
    base_p, rows_p = runs["pyvene"]
    assert_same(base_p, base_h, where="base rows")
    assert_cells_same(rows_p, rows_h, where="pyvene vs hooks")
    assert_same(rows_h["scale1"], base_h, where="scale 1")
    assert_same(rows_h["q3"], rows_h["k3"], where="q x 3 vs k x 3")
    for name in ("block", "q3", "transplant_layer"):
        assert any(first_step_changed(rows_h[name], base_h)), f"{name} changed no logit"

    own = [Cell(f"own_L{l}", [AttentionPattern(l, every)], kind="attention_transplant")
           for l in range(pipeline.num_layers)]
    base_rows, rows = run(pipeline, own, sources=BASES)
    for name in rows:
        assert_same(rows[name], base_rows, where=name)


@EVERY_SHAPE
def test_transplant_equals_the_recorded_source_probabilities(real):
    """Same-length prompts: the engine's transplant of the last layer's last head at the last position equals
    running the bases with a hand-built TransplantAttention of the recorded source probabilities."""
    pipeline = real.pipeline
    layer, head = pipeline.num_layers - 1, pipeline.num_heads - 1
    pos = last_token_position(pipeline)
    _, rows = run(pipeline, [Cell("t", [AttentionPattern(layer, pos, head=head)], kind="attention_transplant")],
                  sources=SAME_LENGTH_SOURCES)
    base, cf = pipeline.load(BASES), pipeline.load(SAME_LENGTH_SOURCES)
    assert base.pad_offsets == cf.pad_offsets
    with torch.no_grad(), attention_control(pipeline.model, [RecordAttention([layer])]) as control:
        pipeline.model.base_model(**cf.model_inputs(), use_cache=False)
    probs = control.get(layer).probs[:, head : head + 1, -1:, :]  # (B, 1, 1, T)
    width = base.input_ids.shape[1]
    n = len(BASES)
    op = TransplantAttention(layer, [head], torch.arange(n), torch.full((n, 1), width - 1), probs, coordinates="cache")
    with torch.no_grad(), attention_control(pipeline.model, [op]):
        expected = pipeline.output_rows(pipeline.greedy_decode(base, lambda inputs: pipeline.body(**inputs)), EXAMPLES)
    assert_same(rows["t"], expected)


# ---------------------------------------------------------------------------------------------- suffix reuse


def suffix_cells(pipeline) -> list[Cell]:
    """Every layer's input and output at each of the last 4 tokens (from the end) and at a two-token position."""
    shortest = min(len(pipeline.tokenize_one(b)["input_ids"]) for b in BASES)
    positions = [TokenPosition(lambda s, k=k: [-k], pipeline, id=f"m{k}") for k in range(1, min(4, shortest) + 1)]
    positions.append(TokenPosition(lambda s: [-4, -2], pipeline, id="pair"))
    return [Cell(f"{component}{layer}@{pos.id}", [ResidualStream(layer, pos, component)])
            for layer in range(pipeline.num_layers) for component in ("block_input", "block_output")
            for pos in positions]


@SWEEP_SHAPES
def test_suffix_reuse_equals_the_plain_path(real):
    pipeline = real.pipeline
    width = pipeline.load(BASES).input_ids.shape[1]
    assert SuffixReuse(pipeline).supports(width) is None, "the fast path must apply to every real shape"
    base_fast, fast = run(pipeline, suffix_cells(pipeline), suffix_reuse=True)
    base_slow, slow = run(pipeline, suffix_cells(pipeline), suffix_reuse=False)
    assert_same(base_fast, base_slow, where="base rows")
    assert_cells_same(fast, slow, where="suffix reuse vs plain")
    changed = [c for c, rows in slow.items() if any(first_step_changed(rows, base_slow))]
    assert len(changed) >= len(slow) // 2, "patching must change the logits for the check to bite"


# ---------------------------------------------------------------------------------------------- real vocabulary


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, s in SHAPES.items() if not s.keep_real_vocab])
def test_real_vocabulary_paths_agree(name):
    """The real vocabulary (Llama 128256 tied, Qwen 151936 tied, Gemma 256000 tied + softcapped, OLMo 100352
    untied): the base rows' first-step logits are the full model's own; residual, head and attention cells give
    the same rows on hooks (suffix reuse), hooks (plain) and pyvene. Top-k projection runs in row chunks here."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        shape = SHAPES[name]
        pipeline = make_pipeline(shape, real_vocab=True)
        assert pipeline.model.get_output_embeddings().weight.shape[0] == shape.config["vocab_size"]
        last = last_token_position(pipeline)
        first = TokenPosition(lambda s: [1], pipeline, id="first_digit")
        H = pipeline.num_heads

        def cells():
            return [Cell("L-1@first_digit", [ResidualStream(-1, first)]), Cell("L0@last", [ResidualStream(0, last)]),
                    Cell("L1@last", [ResidualStream(1, last)]), Cell("head", [AttentionHead(1, H - 1, last)]),
                    Cell("block", [AttentionPattern(0, first)], kind="attention_block")]

        runs = {"hooks": run(pipeline, cells()), "hooks-plain": run(pipeline, cells(), suffix_reuse=False),
                "pyvene": run(pipeline, cells(), "pyvene")}
        for other in ("hooks-plain", "pyvene"):
            assert_same(runs[other][0], runs["hooks"][0], where=f"{other} base rows")
            assert_cells_same(runs[other][1], runs["hooks"][1], where=f"{other} vs hooks")

        batch = pipeline.load(BASES)
        with torch.no_grad():
            own = pipeline.model(**batch.model_inputs()).logits[:, -1].float()  # HF's own head (+ softcap)
        base_rows = runs["hooks"][0]
        for b, row in enumerate(base_rows):
            values = own[b].topk(len(row["topk_token_ids"][0])).values
            assert row["output_token_ids"][0] == int(own[b].argmax())
            torch.testing.assert_close(torch.tensor(row["topk_logits"][0]), values, rtol=RTOL,
                                       atol=logit_atol([row]))
        rows = runs["hooks"][1]
        assert all(first_step_changed(rows["L1@last"], base_rows))
    finally:
        torch.set_num_threads(before)
        gc.collect()
