"""BlockAttention edge cases of experiments.backends.attention_control, each against an independent computation.

1. Fully blocked queries: a query that keeps only itself equals a one-token run of the plain model; a
   query with no visible key left attends to nothing (zero probabilities, zero attention output).
2. float64: a left-padded float64 batch equals the unpadded per-row runs (and sdpa); bfloat16 stays finite.
3. Gemma 2 sliding-window layers: ops keep working once the cache drops keys, compared with the plain
   eager model driven by hand-built per-layer-type masks.
4. ``query_positions`` never lets a query lose itself or a later key.

References use the plain model (its own attention, no ``attention_control``) or hand-written softmaxes.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import FAMILIES, make_model  # noqa: E402
from experiments.backends.attention_control import (  # noqa: E402
    BlockAttention,
    RecordAttention,
    ScaleQK,
    attention_control,
)
from experiments.pipeline import LMPipeline, PromptBatch  # noqa: E402
from experiments.backends.transformers_adapter import output_cache, with_cache  # noqa: E402

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

PROMPTS = ["12+3=", "4+45=9", "7=", "ab c"]
LONG_PROMPTS = ["12+345=", "4+45=99", "7+1=", "ab cd e"]  # longer than the sliding window below
WINDOW = 4


# ---------------------------------------------------------------------------- helpers
def out_projection(model, layer: int):
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].attn.c_proj
    return model.model.layers[layer].self_attn.o_proj


def capture_attention_output(model, layer: int, store: list):
    """Forward pre-hook on the layer's output projection: its input is the attention output (B, Q, H*d)."""
    return out_projection(model, layer).register_forward_pre_hook(lambda module, args: store.append(args[0].detach()))


def decode(pipe, batch, steps: int):
    return pipe.greedy_decode(batch, lambda inputs: pipe.model(**inputs), max_new_tokens=steps)


def one_token_logits(model, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(M, V) logits of M independent one-token sequences (token, position id) through the plain model."""
    with torch.no_grad():
        return model(input_ids=tokens[:, None], position_ids=positions[:, None]).logits[:, 0]


def step_forward(model, ids, mask, positions, cache):
    with torch.no_grad():
        return model(**with_cache(model, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                           "use_cache": True}, cache))


def own_pipe(family: str, tokenizer, dtype=None) -> LMPipeline:
    return LMPipeline(make_model(family, len(tokenizer)), tokenizer=tokenizer, device="cpu", dtype=dtype)


# ---------------------------------------------------------------------------- 1. fully blocked queries
@pytest.mark.parametrize("family", FAMILIES)
def test_every_earlier_key_blocked_leaves_each_token_alone(family, pipelines):
    """Blocking every key everywhere leaves each query its own key only (the causal rule): in the prompt
    pass and in cached decoding, every real position then equals a one-token run of the plain model at
    its position id, and no probability reaches padding or future columns."""
    pipe = pipelines[family]
    batch = pipe.load(PROMPTS)
    B, T = batch.input_ids.shape
    steps = 3
    everything = BlockAttention([list(range(T + steps))], coordinates="cache")
    record = RecordAttention(layers=[0, 1], steps="all")
    with attention_control(pipe.model, [everything, record]) as ctl:
        gen = decode(pipe, batch, steps)
        with torch.no_grad():
            prompt_logits = pipe.model(**batch.model_inputs()).logits

    real = batch.attention_mask.bool()
    expected = one_token_logits(pipe.model, batch.input_ids[real], batch.position_ids[real])
    assert torch.allclose(prompt_logits[real], expected, atol=1e-4, rtol=1e-4)

    # decoding: step s reads token fed at position id last + s (step 0 = the prompt's last token)
    S = gen.token_ids.shape[1]
    fed = torch.cat([batch.input_ids[:, -1:], gen.token_ids[:, : S - 1]], dim=1)  # (B, S)
    pos = batch.position_ids[:, -1:] + torch.arange(S)[None]
    ref = one_token_logits(pipe.model, fed.reshape(-1), pos.reshape(-1)).reshape(B, S, -1)
    ref_vals, ref_ids = ref.float().topk(gen.topk_logits.shape[-1], dim=-1)
    live = torch.arange(S)[None] < torch.tensor(gen.lengths)[:, None]
    assert torch.allclose(gen.topk_logits[live], ref_vals[live], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen.topk_token_ids[live][:, 0], ref_ids[live][:, 0])

    # probabilities: one-hot on the query's own coordinate for every real query, in every forward
    assert len({r.step for r in ctl.records}) == S + 1  # the decoding forwards and one more prompt pass
    for rec in ctl.records:
        Q, K = rec.probs.shape[2], rec.probs.shape[3]
        q_coords = rec.query_offset + torch.arange(Q)
        one_hot = (torch.arange(K)[None, :] == q_coords[:, None]).float()  # (Q, K)
        rows = real[:, rec.query_offset:] if rec.prompt else torch.ones(B, Q, dtype=torch.bool)
        for b in range(B):
            assert torch.equal(rec.probs[b][:, rows[b]], one_hot[rows[b]].expand(rec.probs.shape[1], -1, -1))


def _holed(batch: PromptBatch, row: int, column: int) -> PromptBatch:
    mask = batch.attention_mask.clone()
    mask[row, column] = 0
    return PromptBatch(batch.input_ids, mask, batch.position_ids, batch.lengths, batch.pad_offsets)


@pytest.mark.parametrize("family", FAMILIES)
def test_query_without_a_visible_key_attends_to_nothing(family, pipelines):
    """A 0 in the attention mask hides a token's own column; blocking every earlier key then leaves
    its query no key at all: an all-zero probability row and a zero attention output -- in the prompt
    pass and in a cached decoding step -- never a spread over masked (future, padding) columns."""
    pipe, layer = pipelines[family], 1
    model = pipe.model
    base = pipe.load(PROMPTS)
    B, T = base.input_ids.shape
    row, hole = 1, base.pad_offsets[1] + 3  # a real, not-first column of a left-padded row
    batch = _holed(base, row, hole)
    block = BlockAttention([list(range(T + 2))], layers=[layer], coordinates="cache")
    seen: list = []
    handle = capture_attention_output(model, layer, seen)
    try:
        with attention_control(model, [block, RecordAttention(layers=[layer], steps="all")]) as ctl:
            out = step_forward(model, batch.input_ids, batch.attention_mask, batch.position_ids, None)
            # decoding step whose new token's own column is masked in row `row`
            mask = torch.cat([batch.attention_mask, torch.ones(B, 1, dtype=batch.attention_mask.dtype)], dim=1)
            mask[row, T] = 0
            step = step_forward(model, out.logits[:, -1].argmax(-1)[:, None], mask,
                                batch.position_ids[:, -1:] + 1, output_cache(out))
    finally:
        handle.remove()
    prompt_rec, step_rec = ctl.get(layer, 0), ctl.get(layer, 1)
    assert step_rec.query_offset == T
    for rec, attn_out, q in ((prompt_rec, seen[0], hole), (step_rec, seen[1], 0)):
        assert torch.equal(rec.probs[row, :, q], torch.zeros_like(rec.probs[row, :, q]))
        assert torch.equal(attn_out[row, q], torch.zeros_like(attn_out[row, q]))
        # every other real query of the forward still sums to one over visible keys only
        others = torch.ones(B, rec.probs.shape[2], dtype=torch.bool)
        others[row, q] = False
        if rec.prompt:
            others &= base.attention_mask.bool()
        sums = rec.probs.sum(-1).permute(0, 2, 1)[others]
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert torch.isfinite(out.logits[base.attention_mask.bool()]).all() and torch.isfinite(step.logits).all()


# ---------------------------------------------------------------------------- 2. float64 / bfloat16
@pytest.mark.parametrize("ops", ["none", "scale-record", "block-scale-record"])
@pytest.mark.parametrize("family", FAMILIES)
def test_float64_left_padded_batch_equals_unpadded_rows(family, ops, char_tokenizer):
    """float64, left padding, with and without ops: the padded batch (prompt logits at real positions,
    greedy decoding) equals each row run alone, and (no ops) sdpa; nothing turns NaN."""
    pipe = own_pipe(family, char_tokenizer, dtype=torch.float64)
    model = pipe.model
    batch = pipe.load(PROMPTS)
    B, T = batch.input_ids.shape
    steps = 3

    def ops_for(offsets):
        chosen = []
        if ops.startswith("block"):  # the 3rd real token, hidden from later queries
            chosen.append(BlockAttention([[o + 2] for o in offsets], coordinates="cache"))
        if ops != "none":  # head 1's query at the 2nd real token, layer 1
            chosen += [ScaleQK(1, 1, "query", 2.5, positions=[[o + 1] for o in offsets], coordinates="cache"),
                       RecordAttention(layers=[0, 1], steps="all")]
        return chosen

    with attention_control(model, ops_for(batch.pad_offsets)):
        with torch.no_grad():
            padded = model(**batch.model_inputs()).logits
        gen = decode(pipe, batch, steps)
    assert padded.dtype == torch.float64 and torch.isfinite(padded).all()
    assert torch.isfinite(gen.topk_logits).all()
    for b, prompt in enumerate(PROMPTS):
        single = pipe.load([prompt])
        with attention_control(model, ops_for([0])):
            with torch.no_grad():
                alone = model(**single.model_inputs()).logits[0]
            gen1 = decode(pipe, single, steps)
        off = batch.pad_offsets[b]
        assert torch.allclose(padded[b, off:], alone, atol=1e-10, rtol=0), (family, b)
        n = gen1.lengths[0]
        assert gen.lengths[b] == n and torch.equal(gen.token_ids[b, :n], gen1.token_ids[0, :n])
        assert torch.allclose(gen.topk_logits[b, :n], gen1.topk_logits[0, :n], atol=1e-5, rtol=0)
    if ops == "none" and family != "gemma2":  # sdpa (Gemma 2 has none) is finite in float64 too
        previous = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        try:
            with torch.no_grad():
                sdpa = model(**batch.model_inputs()).logits
        finally:
            model.set_attn_implementation(previous)
        real = batch.attention_mask.bool()
        assert torch.allclose(padded[real], sdpa[real], atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
def test_bfloat16_left_padded_runs_without_nan(family, char_tokenizer):
    pipe = own_pipe(family, char_tokenizer, dtype=torch.bfloat16)
    batch = pipe.load(PROMPTS)
    B, T = batch.input_ids.shape
    keys = [[o + 2] for o in batch.pad_offsets]
    record = RecordAttention(layers=[0, 1], steps="all")
    with attention_control(pipe.model, [BlockAttention(keys, coordinates="cache"), record]) as ctl:
        with torch.no_grad():
            logits = pipe.model(**batch.model_inputs()).logits
        gen = decode(pipe, batch, 3)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert torch.isfinite(gen.topk_logits).all()
    real = batch.attention_mask.bool()
    for rec in ctl.records:
        assert torch.isfinite(rec.probs).all()
        q_coords = rec.query_offset + torch.arange(rec.probs.shape[2])
        for b in range(B):
            later = q_coords > keys[b][0]
            assert (rec.probs[b, :, later, keys[b][0]] == 0).all()
        sums = rec.probs.float().sum(-1).permute(0, 2, 1)
        rows = real[:, rec.query_offset:] if rec.prompt else torch.ones(B, 1, dtype=torch.bool)
        assert torch.allclose(sums[rows], torch.ones_like(sums[rows]), atol=2e-2)


# ---------------------------------------------------------------------------- 3. Gemma 2 sliding window
@pytest.fixture(scope="module")
def sliding(char_tokenizer):
    """Tiny Gemma 2 (layer 0 sliding, layer 1 full) with a window of 4 tokens."""
    model = make_model("gemma2", len(char_tokenizer))
    model.config.sliding_window = WINDOW
    for layer in model.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = WINDOW
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    return LMPipeline(model, tokenizer=char_tokenizer, device="cpu", max_new_tokens=6)


def hand_masks(key_mask, q_start, n_keys, held_sliding, blocks, dtype):
    """Per-layer-type additive masks (B, 1, Q, K) in cache coordinates, built by hand.

    key_mask (B, N) 1 = real; queries are coordinates q_start .. N-1; the sliding layer holds the last
    ``held_sliding`` keys. ``blocks``: {layer type: (B, N) bool keys removed from strictly later queries}.
    """
    B, N = key_mask.shape
    q = torch.arange(q_start, N)[:, None]
    k = torch.arange(N)[None, :]
    causal = (k <= q)[None] & key_mask.bool()[:, None, :]  # (B, Q, N)
    allowed = {"full_attention": causal, "sliding_attention": causal & (q - k < WINDOW)[None]}
    masks = {}
    for kind, ok in allowed.items():
        if kind in blocks:
            ok = ok & ~(blocks[kind][:, None, :] & (k < q)[None])
        if kind == "sliding_attention":
            ok = ok[:, :, N - held_sliding:]
        zero = torch.zeros((), dtype=dtype)
        masks[kind] = torch.where(ok, zero, torch.finfo(dtype).min)[:, None]
    return masks


def reference_decode(pipe, batch, steps: int, blocks: dict):
    """Greedy decoding of the plain eager model under hand-built masks: [(top-1 ids, logits)] per step."""
    model = pipe.model
    B, T = batch.input_ids.shape
    key_mask = batch.attention_mask
    ids, positions, cache, q_start, held, out = batch.input_ids, batch.position_ids, None, 0, T, []
    for step in range(steps):
        N = key_mask.shape[1]
        masks = hand_masks(key_mask, q_start, N, held, {kind: m[:, :N] for kind, m in blocks.items()}, model.dtype)
        with torch.no_grad():
            result = model(**with_cache(model, {"input_ids": ids, "attention_mask": masks, "position_ids": positions,
                                                "use_cache": True}, cache))
        logits = result.logits[:, -1].float()
        out.append(logits)
        cache = output_cache(result)
        ids = logits.argmax(-1)[:, None]
        positions = positions[:, -1:] + 1
        key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=key_mask.dtype)], dim=1)
        q_start, held = N, min(N, WINDOW - 1) + 1
    return out


def block_columns(batch, extra_steps: int, coords_per_row) -> torch.Tensor:
    B, T = batch.input_ids.shape
    cols = torch.zeros(B, T + extra_steps, dtype=torch.bool)
    for b, coords in enumerate(coords_per_row):
        cols[b, coords] = True
    return cols


@pytest.mark.parametrize("layers", [[0], [1], None], ids=["sliding-layer", "full-layer", "all-layers"])
def test_sliding_window_block_matches_hand_masked_reference(sliding, layers):
    """Block a prompt key and a generated key (cache coordinates) while generation runs far past the
    window: equals the plain eager model with the same pairs removed from hand-built masks."""
    pipe, steps = sliding, 6
    batch = pipe.load(LONG_PROMPTS)
    B, T = batch.input_ids.shape
    assert T > WINDOW + 2
    coords = [[off + 3, T + 1] for off in batch.pad_offsets]  # a prompt token, the 2nd generated token
    op = BlockAttention(coords, layers=layers, coordinates="cache")
    with attention_control(pipe.model, [op]):
        gen = pipe.greedy_decode(batch, lambda inputs: pipe.model(**inputs), max_new_tokens=steps)
    assert gen.token_ids.shape[1] == steps, "decoding stopped early (EOS): the window is not passed"
    kinds = {0: ["sliding_attention"], 1: ["full_attention"]}
    removed = block_columns(batch, steps, coords)
    blocks = {kind: removed for layer in (layers or [0, 1]) for kind in kinds[layer]}
    ref = reference_decode(pipe, batch, steps, blocks)
    clean = reference_decode(pipe, batch, steps, {})
    for s in range(steps):
        vals, ids = ref[s].topk(gen.topk_logits.shape[-1], dim=-1)
        assert torch.equal(gen.topk_token_ids[:, s, 0], ids[:, 0]), s
        assert torch.allclose(gen.topk_logits[:, s], vals, atol=1e-5, rtol=1e-5), s
    # the block matters (the test can fail): late steps differ from the unblocked reference
    assert not torch.allclose(ref[steps - 1], clean[steps - 1], atol=1e-4)


def test_sliding_window_prompt_only_block_passes_the_window(sliding):
    """A block on a late prompt key, on the sliding layer only, while decoding passes the window: no
    error, equal to the reference with the same block, the key at 0 for the queries whose window
    holds it, and every coordinate the layer no longer holds at 0."""
    pipe, steps = sliding, 5
    batch = pipe.load(LONG_PROMPTS)
    B, T = batch.input_ids.shape
    coords = [[T - 2] for _ in range(B)]  # seen by the sliding layer from queries T-1 .. T+1 only
    with attention_control(pipe.model, [BlockAttention(coords, layers=[0], coordinates="cache"),
                                        RecordAttention(layers=[0], steps="all")]) as ctl:
        gen = pipe.greedy_decode(batch, lambda inputs: pipe.model(**inputs), max_new_tokens=steps)
    ref = reference_decode(pipe, batch, steps, {"sliding_attention": block_columns(batch, steps, coords)})
    for s in range(gen.token_ids.shape[1]):
        assert torch.allclose(gen.topk_logits[:, s], ref[s].topk(gen.topk_logits.shape[-1], dim=-1).values,
                              atol=1e-5, rtol=1e-5)
    for rec in ctl.records:
        N = rec.probs.shape[-1]
        q = rec.query_offset + torch.arange(rec.probs.shape[2])
        reach = (q > T - 2) & (q - (T - 2) < WINDOW)
        assert (rec.probs[:, :, reach, T - 2] == 0).all()
        if not rec.prompt:
            assert rec.key_offset == N - WINDOW and (rec.probs[..., : N - WINDOW] == 0).all()


def test_sliding_window_records_use_cache_coordinates(sliding):
    """Records at the sliding layer past the window: probs span all N coordinates (0 outside the window),
    keys are the held ones with ``key_offset = N - K``, and probs equal a hand softmax over them."""
    pipe, steps = sliding, 5
    batch = pipe.load(LONG_PROMPTS)
    B, T = batch.input_ids.shape
    op = RecordAttention(layers=[0, 1], what=("probs", "query", "key"), steps="all")
    with attention_control(pipe.model, [op]) as ctl:
        pipe.greedy_decode(batch, lambda inputs: pipe.model(**inputs), max_new_tokens=steps)
    config = pipe.config
    scale, cap = config.query_pre_attn_scalar ** -0.5, config.attn_logit_softcapping
    for step in range(steps):
        N = T + step
        for layer in (0, 1):
            rec = ctl.get(layer, step)
            Q = T if step == 0 else 1
            held = N if (layer == 1 or step == 0) else WINDOW  # DynamicSlidingWindowLayer keeps window-1 + new
            assert rec.query_offset == N - Q and rec.prompt == (step == 0)
            assert rec.probs.shape == (B, pipe.num_heads, Q, N)
            assert rec.key.shape[2] == held and rec.key_offset == N - held
            # hand softmax over the held keys in cache coordinates
            groups = pipe.num_heads // pipe.num_kv_heads
            key = rec.key.repeat_interleave(groups, dim=1).double()
            logits = torch.einsum("bhqd,bhkd->bhqk", rec.query.double(), key) * scale
            logits = cap * torch.tanh(logits / cap)
            qc = (N - Q + torch.arange(Q))[:, None]
            kc = (N - held + torch.arange(held))[None, :]
            key_mask = torch.cat([batch.attention_mask, torch.ones(B, step, dtype=torch.long)], 1)[:, N - held:]
            ok = (kc <= qc)[None] & key_mask.bool()[:, None, :]
            if layer == 0:
                ok = ok & (qc - kc < WINDOW)[None]
            expected = torch.zeros(B, pipe.num_heads, Q, N, dtype=torch.float64)
            expected[..., N - held:] = logits.masked_fill(~ok[:, None], float("-inf")).softmax(-1)
            rows = batch.attention_mask.bool() if step == 0 else torch.ones(B, 1, dtype=torch.bool)
            got = rec.probs.permute(0, 2, 1, 3)[rows].double()
            assert torch.allclose(got, expected.permute(0, 2, 1, 3)[rows], atol=1e-5), (step, layer)
            if layer == 0 and step > 0:
                assert N - held > 0 and (rec.probs[..., : N - held] == 0).all()


def test_sliding_layer_entered_mid_generation_is_refused(sliding):
    """Entered after the prompt pass, a truncated sliding layer cannot tell its coordinates: refused;
    the full layer can, and records its decoding query at coordinate T."""
    pipe = sliding
    model = pipe.model
    batch = pipe.load(LONG_PROMPTS)
    T = batch.input_ids.shape[1]
    mask = torch.cat([batch.attention_mask, torch.ones(len(LONG_PROMPTS), 1, dtype=torch.long)], dim=1)

    def prompt_pass():
        out = step_forward(model, batch.input_ids, batch.attention_mask, batch.position_ids, None)
        return out.logits[:, -1].argmax(-1)[:, None], output_cache(out)

    nxt, cache = prompt_pass()
    with pytest.raises(RuntimeError, match="mid-generation"):
        with attention_control(model, [RecordAttention(layers=[0], steps="all")]):
            step_forward(model, nxt, mask, batch.position_ids[:, -1:] + 1, cache)
    nxt, cache = prompt_pass()
    with attention_control(model, [RecordAttention(layers=[1], steps="all")]) as ctl:
        step_forward(model, nxt, mask, batch.position_ids[:, -1:] + 1, cache)
    assert ctl.get(1, 0).query_offset == T and ctl.get(1, 0).probs.shape[-1] == T + 1


# ---------------------------------------------------------------------------- 4. the causal rule
@pytest.mark.parametrize("family", FAMILIES)
def test_query_positions_never_block_a_query_from_itself(family, pipelines):
    """key c with query_positions [c-1, c, c+1]: only query c+1 loses key c (its row renormalised over
    the rest); queries c-1 (key in its future) and c (itself) are untouched."""
    pipe = pipelines[family]
    batch = pipe.load(PROMPTS)
    B, T = batch.input_ids.shape
    c = torch.tensor([off + 1 for off in batch.pad_offsets])
    qpos = torch.stack([c - 1, c, c + 1], dim=1)
    op = BlockAttention(c[:, None], query_positions=qpos, layers=[0], coordinates="cache")
    with attention_control(pipe.model, [RecordAttention(layers=[0])]) as clean:
        with torch.no_grad():
            pipe.model(**batch.model_inputs())
    with attention_control(pipe.model, [op, RecordAttention(layers=[0])]) as ctl:
        with torch.no_grad():
            pipe.model(**batch.model_inputs())
    got, ref = ctl.get(0).probs, clean.get(0).probs
    expected = ref.clone()
    for b in range(B):
        row = ref[b, :, c[b] + 1].double().clone()
        row[:, c[b]] = 0
        expected[b, :, c[b] + 1] = (row / row.sum(-1, keepdim=True)).float()
        assert (ref[b, :, c[b], c[b]] > 0).all() and (ref[b, :, c[b] + 1, c[b]] > 0).all()
    changed = torch.zeros_like(got, dtype=torch.bool)
    changed[torch.arange(B), :, c + 1] = True
    assert torch.equal(got[~changed], ref[~changed])
    assert torch.allclose(got[changed], expected[changed], atol=1e-6)
    assert (got[torch.arange(B), :, c + 1, c] == 0).all()


def test_query_positions_in_decoding_keep_the_causal_rule(pipelines):
    """In decoding: blocking the first generated token (coordinate T) from itself, or from the query
    before it, changes nothing; blocking it from the next query does."""
    pipe = pipelines["llama"]
    batch = pipe.load(PROMPTS)
    T = batch.input_ids.shape[1]
    with attention_control(pipe.model, []):
        clean = decode(pipe, batch, 3)
    for keys, queries in (([[T]], [[T]]), ([[T]], [[T - 1]]), ([[T + 1]], [[T]])):
        with attention_control(pipe.model, [BlockAttention(keys, query_positions=queries, coordinates="cache")]):
            assert torch.equal(decode(pipe, batch, 3).topk_logits, clean.topk_logits), (keys, queries)
    with attention_control(pipe.model, [BlockAttention([[T]], query_positions=[[T + 1]], coordinates="cache")]):
        blocked = decode(pipe, batch, 3)
    assert torch.equal(blocked.topk_logits[:, :2], clean.topk_logits[:, :2])
    assert not torch.allclose(blocked.topk_logits[:, 2], clean.topk_logits[:, 2], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2", "olmo2"])
def test_float64_eager_pipeline_is_exact_under_left_padding(family, char_tokenizer):
    """transformers' own eager attention NaNs a left-padded float64 batch; the pipeline routes float64 eager
    models to the controlled eager attention, so generation equals the unpadded rows."""
    model = make_model(family, len(char_tokenizer))
    model.set_attn_implementation("eager")
    plain = model.to(torch.float64)(**char_tokenizer(["12+34=", "5+6="], return_tensors="pt", padding=True)).logits
    assert not torch.isfinite(plain).all(), "transformers' eager float64 path no longer NaNs: drop the rerouting"
    pipe = LMPipeline(model, tokenizer=char_tokenizer, device="cpu", dtype=torch.float64)
    prompts = ["12+34=", "5+6="]
    batch = pipe.generate(prompts, max_new_tokens=3)
    assert torch.isfinite(batch.topk_logits).all()
    for row, prompt in enumerate(prompts):
        alone = pipe.generate([prompt], max_new_tokens=3)
        assert batch.token_ids[row, : batch.lengths[row]].tolist() == alone.token_ids[0, : alone.lengths[0]].tolist()
        torch.testing.assert_close(batch.topk_logits[row, : batch.lengths[row]],
                                   alone.topk_logits[0, : alone.lengths[0]], atol=1e-9, rtol=0)
