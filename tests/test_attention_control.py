"""Attention-level interventions (experiments.backends.attention_control) on every tiny model family.

References here are written independently of the module: plain einsum attention with a hand-built
causal + padding mask, and (llama, gemma2, gpt2) a recomputation of layer-1 queries/keys from the
layer's own projections, norm and rotary embedding.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

torch = pytest.importorskip("torch")

from conftest import FAMILIES, make_model  # noqa: E402
from experiments.backends.attention_control import (  # noqa: E402
    ATTENTION_IMPLEMENTATION,
    BlockAttention,
    RecordAttention,
    ScaleQK,
    TransplantAttention,
    UnmatchedKeysWarning,
    align_source_probs,
    attention_control,
    register_attention,
)

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

PROMPTS = ["12+3=", "4+45=9", "7=", "ab c"]
LAYER = 1  # tiny models have layers 0 and 1


# ---------------------------------------------------------------------------- independent references
@contextmanager
def implementation(model, name: str):
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


def attention_modules(pipe):
    if pipe.config.model_type == "gpt2":
        return [block.attn for block in pipe.model.transformer.h]
    return [layer.self_attn for layer in pipe.model.model.layers]


def logit_scale(config, layer: int) -> float:
    """The per-family factor multiplying QKᵀ, derived from the config."""
    if config.model_type == "gpt2":
        scale = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
        return scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale
    if config.model_type == "gemma2":
        return config.query_pre_attn_scalar ** -0.5
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim ** -0.5


def reference_probs(query, key, key_mask, scale, softcap=None, query_offset=0):
    """softmax(QKᵀ·scale [softcapped] + causal/padding mask). query (B,H,q,d), key (B,KV,K,d), key_mask (B,K)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", query.double(), key.double()) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    q_pos = query_offset + torch.arange(query.shape[2])
    k_pos = torch.arange(key.shape[2])
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & key_mask.bool()[:, None, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1).float()


def real_queries(batch) -> torch.Tensor:
    """(B, T) bool: non-padding query rows (padding queries see no real key and are left out)."""
    return batch.attention_mask.bool()


def softcap_of(config):
    return getattr(config, "attn_logit_softcapping", None) if config.model_type == "gemma2" else None


def manual_qk(pipe, batch, layer: int):
    """Layer ``layer``'s queries (B,H,T,d) and keys (B,KV,T,d) rebuilt from its input hidden states."""
    model, config = pipe.model, pipe.config
    with implementation(model, "eager"), torch.no_grad():
        hidden = model(**batch.model_inputs(), output_hidden_states=True).hidden_states[layer]
        B, T, _ = hidden.shape
        if config.model_type == "gpt2":
            block = model.transformer.h[layer]
            q, k, _ = block.attn.c_attn(block.ln_1(hidden)).split(config.n_embd, dim=2)
            d = config.n_embd // config.n_head
            return (q.reshape(B, T, -1, d).permute(0, 2, 1, 3), k.reshape(B, T, -1, d).permute(0, 2, 1, 3))
        decoder = model.model.layers[layer]
        x = decoder.input_layernorm(hidden)
        d = decoder.self_attn.head_dim
        q = decoder.self_attn.q_proj(x).reshape(B, T, -1, d).permute(0, 2, 1, 3)
        k = decoder.self_attn.k_proj(x).reshape(B, T, -1, d).permute(0, 2, 1, 3)
        cos, sin = model.model.rotary_emb(x, batch.position_ids)
        cos, sin = cos[:, None], sin[:, None]

        def rotate(t):
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

        return rotate(q), rotate(k)


@pytest.fixture(params=FAMILIES)
def pipe(request, pipelines):
    return pipelines[request.param]


@pytest.fixture
def batch(pipe):
    return pipe.load(PROMPTS)


# ---------------------------------------------------------------------------- registration / context
def test_registered_in_both_registries():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert register_attention() == register_attention() == ATTENTION_IMPLEMENTATION
    assert ATTENTION_IMPLEMENTATION in AttentionInterface._global_mapping
    assert ATTENTION_IMPLEMENTATION in AttentionMaskInterface._global_mapping


def test_no_ops_equals_eager_exactly_and_sdpa_closely(pipe, batch):
    model = pipe.model
    before = model.config._attn_implementation
    with implementation(model, "eager"):
        eager = logits_of(model, batch)
    with attention_control(model, []):
        assert model.config._attn_implementation == ATTENTION_IMPLEMENTATION
        ours = logits_of(model, batch)
    assert model.config._attn_implementation == before
    assert torch.equal(ours, eager)
    if pipe.config.model_type != "gemma2":  # sdpa refuses Gemma 2's logit softcap
        with implementation(model, "sdpa"):
            sdpa = logits_of(model, batch)
        real = real_queries(batch)
        assert torch.allclose(ours[real], sdpa[real], atol=1e-5, rtol=0)


def test_restores_implementation_after_exception_and_refuses_nesting(pipelines):
    model = pipelines["llama"].model
    before = model.config._attn_implementation
    with pytest.raises(ZeroDivisionError):
        with attention_control(model, []):
            1 / 0
    assert model.config._attn_implementation == before
    with attention_control(model, []):
        with pytest.raises(RuntimeError, match="already active"):
            with attention_control(model, []):
                pass
    assert model.config._attn_implementation == before
    assert not any("_attention_controller" in m.__dict__ for m in model.modules())


def test_ops_are_per_model(pipelines):
    """Ops on one model do not reach another model running at the same time."""
    llama, qwen = pipelines["llama"], pipelines["qwen2"]
    batch = qwen.load(PROMPTS)
    reference = logits_of(qwen.model, batch)
    keys = torch.tensor([[1, 2, 3]])
    with attention_control(llama.model, [BlockAttention(keys, coordinates="cache")]):
        assert torch.equal(logits_of(qwen.model, batch), reference)


@pytest.mark.parametrize(
    "op, message",
    [
        (RecordAttention(layers=[5]), "layer 5 out of range"),
        (RecordAttention(layers=[0], heads=[9]), "head 9 out of range"),
        (ScaleQK(layer=0, heads=4, target="query", factor=2.0), "head 4 out of range"),
        (BlockAttention([[1]], rows=[7], coordinates="cache"), "row 7 out of range"),
    ],
)
def test_out_of_range_targets_are_named(pipelines, op, message):
    pipe = pipelines["llama"]
    with pytest.raises(ValueError, match=message):
        with attention_control(pipe.model, [op]):
            logits_of(pipe.model, pipe.load(PROMPTS))


def test_op_shape_errors():
    with pytest.raises(ValueError, match="probs must have shape"):
        TransplantAttention(0, [0, 1], rows=[0], query_positions=[[3]], probs=torch.zeros(1, 1, 1, 5), coordinates="cache")
    with pytest.raises(ValueError, match="steps"):
        RecordAttention(layers=[0], steps="decode")
    with pytest.raises(ValueError, match="-1 as padding"):
        BlockAttention([[-2]], coordinates="cache")


# ---------------------------------------------------------------------------- recording
def test_recorded_probs_match_reference_from_recorded_qk(pipe, batch):
    config = pipe.config
    op = RecordAttention(layers=[0, 1], what=("probs", "query", "key", "value"))
    with attention_control(pipe.model, [op]) as ctl:
        logits_of(pipe.model, batch)
    B, T = batch.input_ids.shape
    kv = pipe.num_kv_heads
    for layer in (0, 1):
        rec = ctl.get(layer)
        assert rec.prompt and rec.step == 0
        assert rec.probs.shape == (B, pipe.num_heads, T, T)
        assert rec.query.shape[:3] == (B, pipe.num_heads, T)
        assert rec.key.shape[:3] == rec.value.shape[:3] == (B, kv, T)
        expected = reference_probs(rec.query, rec.key, batch.attention_mask, logit_scale(config, layer),
                                   softcap_of(config))
        real = real_queries(batch)
        got = rec.probs.permute(0, 2, 1, 3)[real]
        assert torch.allclose(got, expected.permute(0, 2, 1, 3)[real], atol=1e-5, rtol=1e-4)
        pad_keys = ~batch.attention_mask.bool()
        real_to_pad = real[:, None, :, None] & pad_keys[:, None, None, :]  # (B, 1, q, K)
        assert pad_keys.any() and (rec.probs[real_to_pad.expand_as(rec.probs)] == 0).all()


def test_record_selects_heads_and_query_positions(pipelines):
    pipe = pipelines["qwen2"]
    batch = pipe.load(PROMPTS)
    per_row = torch.tensor([[5, 6], [4, 6], [6, 5], [3, 6]])
    ops = [RecordAttention(layers=[1]), RecordAttention(layers=[1], heads=[2, 0], query_positions=[6, 4], coordinates="cache"),
           RecordAttention(layers=[1], heads=[3], query_positions=per_row, coordinates="cache")]
    with attention_control(pipe.model, ops) as ctl:
        logits_of(pipe.model, batch)
    full = ctl.get(1, op_index=0).probs
    shared = ctl.get(1, op_index=1)
    assert shared.heads == (2, 0) and shared.query == shared.key == None  # noqa: E711 (not asked)
    assert torch.equal(shared.probs, full[:, [2, 0]][:, :, [6, 4]])
    rowwise = ctl.get(1, op_index=2).probs
    for b in range(len(PROMPTS)):
        assert torch.equal(rowwise[b, 0], full[b, 3, per_row[b]])


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_recorded_probs_match_manual_recomputation(pipelines, family):
    pipe = pipelines[family]
    batch = pipe.load(PROMPTS)
    query, key = manual_qk(pipe, batch, LAYER)
    with attention_control(pipe.model, [RecordAttention(layers=[LAYER], what=("probs", "query", "key"))]) as ctl:
        logits_of(pipe.model, batch)
    rec = ctl.get(LAYER)
    assert torch.allclose(rec.query, query, atol=1e-5)
    assert torch.allclose(rec.key, key, atol=1e-5)
    expected = reference_probs(query, key, batch.attention_mask, logit_scale(pipe.config, LAYER),
                               softcap_of(pipe.config))
    real = real_queries(batch)
    assert torch.allclose(rec.probs.permute(0, 2, 1, 3)[real], expected.permute(0, 2, 1, 3)[real], atol=1e-5)


def test_decoding_records_use_cache_coordinates(pipe, batch):
    op = RecordAttention(layers=[LAYER], what=("probs", "query", "key"), steps="all")
    with attention_control(pipe.model, [op]) as ctl:
        pipe.greedy_decode(batch, lambda inputs: pipe.model(**inputs), max_new_tokens=3)
    T = batch.input_ids.shape[1]
    steps = sorted({r.step for r in ctl.records})
    assert steps == [0, 1, 2]
    mask = batch.attention_mask
    for step in steps:
        rec = ctl.get(LAYER, step)
        K = T + step
        assert rec.prompt == (step == 0) and rec.query_offset == (0 if step == 0 else K - 1)
        assert rec.probs.shape[-1] == K
        key_mask = torch.cat([mask, torch.ones(mask.shape[0], step, dtype=mask.dtype)], dim=1)
        expected = reference_probs(rec.query, rec.key, key_mask, logit_scale(pipe.config, LAYER),
                                   softcap_of(pipe.config), query_offset=rec.query_offset)
        rows = real_queries(batch) if step == 0 else torch.ones(mask.shape[0], 1, dtype=torch.bool)
        assert torch.allclose(rec.probs.permute(0, 2, 1, 3)[rows], expected.permute(0, 2, 1, 3)[rows], atol=1e-5)


# ---------------------------------------------------------------------------- mask / softcap / gpt2 scaling
def test_future_tokens_do_not_leak(pipe):
    """Without the mask registration the model would attend to the future: position t must ignore t+1.."""
    a, b = pipe.load(["12+345"]), pipe.load(["12+999"])
    with attention_control(pipe.model, []):
        la, lb = logits_of(pipe.model, a), logits_of(pipe.model, b)
    prefix = 4  # "<s>12+" identical
    assert torch.equal(la[:, :prefix], lb[:, :prefix])
    assert not torch.allclose(la[:, prefix:], lb[:, prefix:])


def test_gemma2_softcap_is_applied(pipelines):
    pipe = pipelines["gemma2"]
    batch = pipe.load(PROMPTS)
    modules = attention_modules(pipe)
    assert all(m.attn_logit_softcapping for m in modules)
    with attention_control(pipe.model, []):
        capped = logits_of(pipe.model, batch)
    saved = [m.attn_logit_softcapping for m in modules]
    try:
        for m in modules:
            m.attn_logit_softcapping = None
        with attention_control(pipe.model, []):
            uncapped = logits_of(pipe.model, batch)
        with implementation(pipe.model, "eager"):
            eager_uncapped = logits_of(pipe.model, batch)
    finally:
        for m, value in zip(modules, saved):
            m.attn_logit_softcapping = value
    assert torch.equal(uncapped, eager_uncapped)
    assert not torch.allclose(capped, uncapped, atol=1e-4)


def test_gpt2_inverse_layer_idx_scaling(char_tokenizer):
    from experiments.pipeline import LMPipeline

    model = make_model("gpt2", len(char_tokenizer))
    model.config.scale_attn_by_inverse_layer_idx = True
    for block in model.transformer.h:  # the flag is folded into each layer's scaling at construction
        block.attn.scaling = (block.attn.head_dim ** -0.5) / (block.attn.layer_idx + 1)
    pipe = LMPipeline(model, tokenizer=char_tokenizer, device="cpu")
    batch = pipe.load(PROMPTS)
    with implementation(model, "eager"):
        eager = logits_of(model, batch)
    with attention_control(model, [RecordAttention(layers=[1], what=("probs", "query", "key"))]) as ctl:
        ours = logits_of(model, batch)
    assert torch.equal(ours, eager)
    rec, real = ctl.get(1), real_queries(batch)
    got = rec.probs.permute(0, 2, 1, 3)[real]
    inverse = reference_probs(rec.query, rec.key, batch.attention_mask, logit_scale(model.config, 1))
    head_dim = model.config.n_embd // model.config.n_head
    plain = reference_probs(rec.query, rec.key, batch.attention_mask, head_dim ** -0.5)
    assert torch.allclose(got, inverse.permute(0, 2, 1, 3)[real], atol=1e-5)
    assert not torch.allclose(got, plain.permute(0, 2, 1, 3)[real], atol=1e-3)


# ---------------------------------------------------------------------------- transplant
def test_transplanting_own_pattern_changes_nothing(pipe, batch):
    with attention_control(pipe.model, [RecordAttention(layers=[0, 1])]) as ctl:
        clean = logits_of(pipe.model, batch)
    B, T = batch.input_ids.shape
    everywhere = torch.arange(T).expand(B, T)
    for rows in (torch.arange(B), None):  # rows=None: every row, as the other operations read it
        ops = [TransplantAttention(layer, list(range(pipe.num_heads)), rows, everywhere, ctl.get(layer).probs, coordinates="cache")
               for layer in (0, 1)]
        with attention_control(pipe.model, ops):
            assert torch.equal(logits_of(pipe.model, batch), clean)


def test_transplant_from_another_run_equals_hand_written_attention(pipe):
    """Base rows 0,1 take source rows 2,3's layer-1 pattern for heads [1, 2] at the last 3 columns."""
    batch = pipe.load(["12+3=", "4+45=9", "9+87=1", "33+4="])
    B, T = batch.input_ids.shape
    heads, rows, source_rows = [1, 2], torch.tensor([0, 1]), torch.tensor([2, 3])
    qpos = torch.tensor([[T - 3, T - 2, T - 1]] * 2)
    with attention_control(pipe.model, [RecordAttention(layers=[LAYER])]) as ctl:
        logits_of(pipe.model, batch)
    clean = ctl.get(LAYER).probs
    source = clean[source_rows][:, heads][:, :, T - 3:]  # (2, 2, 3, T)

    attn = attention_modules(pipe)[LAYER]
    captured = {}

    def keep_output(module, args, output) -> None:
        captured["out"] = output[0]

    handle = attn.register_forward_hook(keep_output)
    ops = [TransplantAttention(LAYER, heads, rows, qpos, source, coordinates="cache"),
           RecordAttention(layers=[LAYER], what=("probs", "value"))]
    try:
        with attention_control(pipe.model, ops) as ctl2:
            patched_logits = logits_of(pipe.model, batch)
    finally:
        handle.remove()
    rec = ctl2.get(LAYER)

    expected_probs = clean.clone()
    for i, row in enumerate(rows.tolist()):
        for j, head in enumerate(heads):
            expected_probs[row, head, T - 3:] = source[i, j]
    assert torch.equal(rec.probs, expected_probs)
    groups = pipe.num_heads // pipe.num_kv_heads
    value = rec.value.repeat_interleave(groups, dim=1)
    mixed = torch.einsum("bhqk,bhkd->bqhd", expected_probs, value).reshape(B, T, -1)
    out_proj = attn.c_proj if pipe.config.model_type == "gpt2" else attn.o_proj
    with torch.no_grad():
        expected_out = out_proj(mixed)
    assert torch.allclose(captured["out"], expected_out, atol=1e-5)
    assert not torch.allclose(patched_logits, logits_of(pipe.model, batch), atol=1e-4)


def test_transplant_checks_key_count(pipelines):
    pipe = pipelines["llama"]
    batch = pipe.load(PROMPTS)
    op = TransplantAttention(0, [0], [0], [[1]], torch.ones(1, 1, 1, 3) / 3, coordinates="cache")
    with pytest.raises(ValueError, match="probs have 3 keys"):
        with attention_control(pipe.model, [op]):
            logits_of(pipe.model, batch)


def test_align_source_probs():
    source = torch.tensor([[[[0.1, 0.2, 0.3, 0.4]]], [[[0.5, 0.5, 0.0, 0.0]]]])  # (2, 1, 1, 4)
    key_map = torch.tensor([[-1, 3, 1, 2, -1], [2, 3, 2, -1, -1]])
    with pytest.warns(UnmatchedKeysWarning, match="1 \\(row, head, query\\)"):
        aligned = align_source_probs(source, key_map)
    assert aligned.shape == (2, 1, 1, 5)
    expected0 = torch.tensor([0.0, 0.4, 0.2, 0.3, 0.0]) / 0.9
    assert torch.allclose(aligned[0, 0, 0], expected0)
    assert torch.equal(aligned[1], torch.zeros(1, 1, 5))  # matched keys carry no mass
    with pytest.raises(ValueError, match="key_map entries"):
        align_source_probs(source, torch.tensor([[4, 0], [0, 0]]))


# ---------------------------------------------------------------------------- block
def test_blocking_nothing_changes_nothing(pipe, batch):
    with attention_control(pipe.model, []):
        clean = logits_of(pipe.model, batch)
    with attention_control(pipe.model, [BlockAttention(torch.full((len(PROMPTS), 2), -1), coordinates="cache")]):
        assert torch.equal(logits_of(pipe.model, batch), clean)


def test_blocked_key_gets_zero_probability_in_prompt_and_decoding(pipe, batch):
    B, T = batch.input_ids.shape
    key_cols = torch.tensor([[off + 2] for off in batch.pad_offsets])  # third real token of every row
    block = BlockAttention(key_cols, coordinates="cache")
    record = RecordAttention(layers=[0, 1], steps="all")
    with attention_control(pipe.model, [block, record]) as ctl:
        blocked = pipe.greedy_decode(batch, lambda inputs: pipe.model(**inputs), max_new_tokens=3)
    assert {r.step for r in ctl.records} == {0, 1, 2}
    for rec in ctl.records:
        q_coords = rec.query_offset + torch.arange(rec.probs.shape[2])
        for b in range(B):
            col = int(key_cols[b, 0])
            later = q_coords > col
            assert (rec.probs[b, :, later, col] == 0).all()
            if rec.prompt:  # the key's own query still reads it
                assert (rec.probs[b, :, col, col] > 0).all()
    with attention_control(pipe.model, []) as _:
        clean = pipe.greedy_decode(batch, lambda inputs: pipe.model(**inputs), max_new_tokens=3)
    assert not torch.allclose(blocked.topk_logits, clean.topk_logits, atol=1e-4)


def test_cache_columns_convert_token_positions_of_the_unpadded_prompts(pipe, batch):
    assert torch.equal(batch.cache_columns([[2]] * len(PROMPTS)),
                       torch.tensor([[off + 2] for off in batch.pad_offsets]))
    ragged = batch.cache_columns([[0, -1], [1], [], [2, 0]])
    assert ragged.tolist() == [[batch.pad_offsets[0], batch.pad_offsets[0] + batch.lengths[0] - 1],
                               [batch.pad_offsets[1] + 1, -1], [-1, -1],
                               [batch.pad_offsets[3] + 2, batch.pad_offsets[3]]]
    with pytest.raises(ValueError, match="outside row 2"):
        batch.cache_columns([[0], [0], [99], [0]])


def test_block_and_record_take_the_same_steps_option(pipe, batch):
    """steps="prompt" blocks the key in the prompt pass only: decoding queries read it again."""
    key_cols = batch.cache_columns([[2]] * len(PROMPTS))
    for steps in ("all", "prompt"):
        ops = [BlockAttention(key_cols, steps=steps, coordinates="cache"), RecordAttention(layers=[1], steps="all")]
        with attention_control(pipe.model, ops) as ctl:
            pipe.greedy_decode(batch, lambda inputs: pipe.model(**inputs), max_new_tokens=2)
        decoding = [r for r in ctl.records if not r.prompt]
        prompt = [r for r in ctl.records if r.prompt]
        read = torch.stack([r.probs[b, :, :, int(key_cols[b, 0])] for r in decoding for b in range(len(key_cols))])
        assert (read == 0).all() if steps == "all" else (read > 0).all()
        later = prompt[0].probs[0, :, int(key_cols[0, 0]) + 1:, int(key_cols[0, 0])]
        assert (later == 0).all()
    with pytest.raises(ValueError, match="steps must be"):
        BlockAttention(key_cols, steps="decoding", coordinates="cache")
    with pytest.raises(ValueError, match="prompt pass only"):
        TransplantAttention(1, [0], [0], [[1]], torch.zeros(1, 1, 1, 4), steps="all", coordinates="cache")


def test_record_query_positions_take_the_padding_the_other_operations_take(pipelines):
    pipe = pipelines["llama"]
    batch = pipe.load(PROMPTS)
    padded = torch.tensor([[5, -1], [4, 6], [-1, -1], [3, 6]])
    ops = [RecordAttention(layers=[1]), RecordAttention(layers=[1], query_positions=padded, coordinates="cache")]
    with attention_control(pipe.model, ops) as ctl:
        logits_of(pipe.model, batch)
    full, got = ctl.get(1, op_index=0).probs, ctl.get(1, op_index=1).probs
    for b in range(len(PROMPTS)):
        for j, q in enumerate(padded[b].tolist()):
            assert torch.equal(got[b, :, j], full[b, :, q] if q >= 0 else torch.zeros_like(full[b, :, 0]))
    with pytest.raises(ValueError, match="non-negative"):
        RecordAttention(layers=[1], query_positions=[-1, 2], coordinates="cache")


def test_block_with_rows_heads_layers_and_query_positions(pipelines):
    pipe = pipelines["llama"]
    batch = pipe.load(PROMPTS)
    T = batch.input_ids.shape[1]
    op = BlockAttention([[T - 3]], rows=[1], query_positions=[[T - 1]], layers=[1], heads=[2], coordinates="cache")
    with attention_control(pipe.model, [RecordAttention(layers=[0, 1])]) as clean:
        logits_of(pipe.model, batch)
    with attention_control(pipe.model, [op, RecordAttention(layers=[0, 1])]) as ctl:
        logits_of(pipe.model, batch)
    assert torch.equal(ctl.get(0).probs, clean.get(0).probs)
    got, ref = ctl.get(1).probs, clean.get(1).probs
    assert got[1, 2, T - 1, T - 3] == 0 and ref[1, 2, T - 1, T - 3] > 0
    assert torch.allclose(got[1, 2, T - 1].sum(), torch.tensor(1.0))
    changed = torch.zeros_like(got, dtype=torch.bool)
    changed[1, 2, T - 1] = True
    assert torch.equal(got[~changed], ref[~changed])


# ---------------------------------------------------------------------------- scale
def test_scale_by_one_changes_nothing(pipe, batch):
    with attention_control(pipe.model, []):
        clean = logits_of(pipe.model, batch)
    ops = [ScaleQK(LAYER, 1, "query", 1.0), ScaleQK(LAYER, 2, "key", 1.0)]
    with attention_control(pipe.model, ops):
        assert torch.equal(logits_of(pipe.model, batch), clean)


def test_scaling_queries_equals_scaling_keys(pipe, batch):
    with attention_control(pipe.model, []):
        clean = logits_of(pipe.model, batch)
    with attention_control(pipe.model, [ScaleQK(LAYER, 1, "query", 3.0)]):
        by_query = logits_of(pipe.model, batch)
    with attention_control(pipe.model, [ScaleQK(LAYER, 1, "key", 3.0)]):
        by_key = logits_of(pipe.model, batch)
    assert torch.allclose(by_query, by_key, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_query, clean, atol=1e-3)


def test_scaling_one_heads_keys_leaves_its_kv_group_alone(pipe, batch):
    groups = pipe.num_heads // pipe.num_kv_heads
    head = 1
    with attention_control(pipe.model, [RecordAttention(layers=[LAYER])]) as clean:
        logits_of(pipe.model, batch)
    with attention_control(pipe.model, [ScaleQK(LAYER, head, "key", 4.0), RecordAttention(layers=[LAYER])]) as ctl:
        logits_of(pipe.model, batch)
    got, ref = ctl.get(LAYER).probs, clean.get(LAYER).probs
    siblings = [h for h in range(pipe.num_heads) if h != head and h // groups == head // groups]
    assert len(siblings) == groups - 1
    others = [h for h in range(pipe.num_heads) if h != head]
    assert torch.equal(got[:, siblings], ref[:, siblings])  # same kv head, untouched
    assert torch.equal(got[:, others], ref[:, others])
    assert not torch.allclose(got[:, head], ref[:, head], atol=1e-4)


def test_scale_at_positions_per_row(pipelines):
    """Scaling row 0's query at one column changes exactly that query row of that head."""
    pipe = pipelines["gemma2"]
    batch = pipe.load(PROMPTS)
    T = batch.input_ids.shape[1]
    with attention_control(pipe.model, [RecordAttention(layers=[0])]) as clean:
        logits_of(pipe.model, batch)
    op = ScaleQK(0, 3, "query", 5.0, positions=[[T - 1]], rows=[0], coordinates="cache")
    with attention_control(pipe.model, [op, RecordAttention(layers=[0])]) as ctl:
        logits_of(pipe.model, batch)
    got, ref = ctl.get(0).probs, clean.get(0).probs
    changed = torch.zeros_like(got, dtype=torch.bool)
    changed[0, 3, T - 1] = True
    assert torch.equal(got[~changed], ref[~changed])
    assert not torch.allclose(got[changed], ref[changed], atol=1e-4)


def test_sliding_layer_records_cover_every_cache_coordinate(char_tokenizer):
    """Once decoding passes a sliding window the cache drops keys: records still use cache coordinates
    (dropped keys read 0), on full-attention and sliding layers alike (tests/test_attention_blocking.py
    checks the sliding layers' ops against a hand-masked reference)."""
    from experiments.pipeline import LMPipeline

    model = make_model("gemma2", len(char_tokenizer))
    model.config.sliding_window = 3
    pipe = LMPipeline(model, tokenizer=char_tokenizer, device="cpu")
    batch = pipe.load(PROMPTS)
    width = batch.input_ids.shape[1]
    for layer in (1, 0):  # full attention, sliding window
        with attention_control(model, [RecordAttention(layers=[layer], steps="all")]) as ctl:
            pipe.greedy_decode(batch, lambda inputs: model(**inputs), max_new_tokens=2)
        assert [r.probs.shape[-1] for r in ctl.records] == [width, width + 1]


# ---------------------------------------------------------------------------- prompt coordinates
def _generated(pipe, batch, ops):
    """Greedy answers (3 tokens) and their top-k logits under ``ops``: every decoding step runs them too."""
    with attention_control(pipe.model, ops):
        out = pipe.generate(batch, max_new_tokens=3)
    return out.token_ids, out.topk_logits


def test_prompt_coordinates_equal_cache_columns_plus_padding(pipe, batch):
    """Each op in prompt coordinates (token indices of each row's unpadded prompt, then its generated tokens)
    does exactly what it does in cache coordinates with the row's left padding added, prompt pass and decoding."""
    offsets, lengths = batch.pad_offsets, batch.lengths
    T, B = batch.input_ids.shape[1], len(PROMPTS)
    assert len(set(offsets)) > 1, "rows must be padded differently for the check to bite"
    last = [[n - 1] for n in lengths]  # each row's last prompt token
    first = [[0] for _ in lengths]
    answer = [[n, n + 1] for n in lengths]  # each row's first two generated tokens

    def cache(rows_positions):
        return [[p + o for p in row] for row, o in zip(rows_positions, offsets)]

    probs = torch.zeros(B, 1, 1, max(lengths))
    for r, n in enumerate(lengths):
        probs[r, 0, 0, :n] = 1.0 / n
    cached_probs = torch.zeros(B, 1, 1, T)
    for r, (n, o) in enumerate(zip(lengths, offsets)):
        cached_probs[r, 0, 0, o:] = 1.0 / n
    pairs = [
        (lambda c, k: BlockAttention(k(first), query_positions=k(answer), coordinates=c), "block at decoding steps"),
        (lambda c, k: BlockAttention(k(first), layers=[LAYER], steps="prompt", coordinates=c), "block"),
        (lambda c, k: ScaleQK(LAYER, [0, 1], "key", 4.0, positions=k(first), coordinates=c), "scale keys"),
        (lambda c, k: TransplantAttention(LAYER, [0], None, k(last), probs if c == "prompt" else cached_probs,
                                          coordinates=c), "transplant"),
    ]
    with attention_control(pipe.model, []):
        clean = pipe.generate(batch, max_new_tokens=3).topk_logits
    for make, what in pairs:
        by_token = _generated(pipe, batch, [make("prompt", lambda x: x)])
        by_column = _generated(pipe, batch, [make("cache", cache)])
        assert torch.equal(by_token[0], by_column[0]), what
        assert torch.equal(by_token[1], by_column[1]), what
        assert not torch.allclose(by_token[1], clean, atol=1e-4), f"{what} must change something"
    with attention_control(pipe.model, [RecordAttention([LAYER], query_positions=[0], coordinates="prompt"),
                                        RecordAttention([LAYER], query_positions=cache(first), coordinates="cache")]) as ctl:
        logits_of(pipe.model, batch)
    assert torch.equal(ctl.get(LAYER, op_index=0).probs, ctl.get(LAYER, op_index=1).probs)


def test_scaling_a_head_list_equals_one_op_per_head(pipe, batch):
    with attention_control(pipe.model, [ScaleQK(LAYER, [0, 2], "query", 2.0)]):
        together = logits_of(pipe.model, batch)
    with attention_control(pipe.model, [ScaleQK(LAYER, 0, "query", 2.0), ScaleQK(LAYER, 2, "query", 2.0)]):
        apart = logits_of(pipe.model, batch)
    with attention_control(pipe.model, [ScaleQK(LAYER, None, "query", 2.0)]):
        every = logits_of(pipe.model, batch)
    with attention_control(pipe.model, [ScaleQK(LAYER, list(range(pipe.num_heads)), "query", 2.0)]):
        listed = logits_of(pipe.model, batch)
    assert torch.equal(together, apart)
    assert torch.equal(every, listed)
    assert not torch.allclose(together, every, atol=1e-4)


def test_prompt_coordinates_refuse_right_padding_and_unknown_names(pipelines):
    pipe = pipelines["llama"]
    batch = pipe.load(PROMPTS)
    right = torch.flip(batch.attention_mask, dims=[1])  # tokens first, padding after
    op = BlockAttention([[0]], coordinates="prompt")
    with attention_control(pipe.model, [op]), pytest.raises(ValueError, match="not left-padded"):
        pipe.model(input_ids=batch.input_ids, attention_mask=right)
    with pytest.raises(ValueError, match="coordinates must be"):
        BlockAttention([[0]], coordinates="tokens")


def test_unstated_coordinates_read_cache_columns_and_warn_only_where_it_matters(pipelines):
    """Positions without coordinates= keep the old meaning (cache columns) for this release: a FutureWarning on a
    padded batch, where the two conventions differ, and none on an unpadded one."""
    import warnings

    pipe = pipelines["llama"]
    padded, single = pipe.load(PROMPTS), pipe.load(PROMPTS[:1])
    keys = [[o] for o in padded.pad_offsets]
    with attention_control(pipe.model, [BlockAttention(keys, coordinates="cache")]):
        stated = logits_of(pipe.model, padded)
    with pytest.warns(FutureWarning, match="without coordinates"):
        with attention_control(pipe.model, [BlockAttention(keys)]):
            unstated = logits_of(pipe.model, padded)
    assert torch.equal(stated, unstated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with attention_control(pipe.model, [BlockAttention([[0]])]):
            logits_of(pipe.model, single)
