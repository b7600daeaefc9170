"""Continuous-thought study: runner, CODI loader, blocking, edits, taxonomy, features, statistics, smoke run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from experiments.backends.attention_control import RecordAttention
from tasks.ct_positions.codi import CODISpec, lora_targets, load_codi, save_codi_checkpoint, split_state_dict
from tasks.ct_positions.error_taxonomy import classify, paired_bootstrap_diff, reversal_results, taxonomy_report
from experiments.backends.transformers_adapter import output_cache, with_cache
from tasks.ct_positions.latent_reasoning import (
    CODIProjection,
    ExplicitCoTRunner,
    LatentConfig,
    LatentReasoner,
    ThoughtEdit,
    block_thoughts,
    last_number,
)
from tasks.ct_positions.problem_sensitivity import correlation, problem_features, sensitivity_report
from tasks.ct_positions.data import chain, generate_problems, gsm8k_problem, load_gsm8k, render_compact
from tasks.ct_positions.organism import build_tokenizer

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

torch.set_num_threads(1)
QUESTIONS = ["3+4*2=", "12-3=", "7/7+1-1="]


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)).eval()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def reasoner_for(model, tok, k: int = 3, masked: bool = True, projection=None) -> LatentReasoner:
    bot, eot = tok.convert_tokens_to_ids("<bot>"), tok.convert_tokens_to_ids("<eot>")
    cfg = LatentConfig(num_thoughts=k, bot_ids=[bot], eot_ids=[eot], max_new_tokens=5, stop_ids=[tok.eos_token_id],
                       attention_mask_in_latent=masked)
    return LatentReasoner(model, tok, cfg, projection)


# ---------------------------------------------------------------------------- runner
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_zero_thoughts_equals_plain_greedy_generation(make, tok):
    model = make(len(tok))
    cfg = LatentConfig(num_thoughts=0, max_new_tokens=6)
    run = LatentReasoner(model, tok, cfg).run(QUESTIONS)
    for q, ids in zip(QUESTIONS, run.token_ids):
        enc = tok(q, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert ids == gen[0, enc["input_ids"].shape[1]:].tolist()


def hand_loop(model, tok, question: str, k: int, projection, steps: int) -> list[int]:
    """Reference: one question, no padding, a plain loop over the model's forward."""
    bot, eot = tok.convert_tokens_to_ids("<bot>"), tok.convert_tokens_to_ids("<eot>")
    ids = torch.tensor([tok(question)["input_ids"] + [bot]])
    out = model(input_ids=ids, use_cache=True, output_hidden_states=True)
    cache, h = output_cache(out), out.hidden_states[-1][:, -1:]
    for _ in range(k):
        out = model(**with_cache(model, {"inputs_embeds": projection(h), "use_cache": True,
                                         "output_hidden_states": True}, cache))
        cache, h = output_cache(out), out.hidden_states[-1][:, -1:]
    out = model(**with_cache(model, {"input_ids": torch.tensor([[eot]]), "use_cache": True}, cache))
    generated = []
    for _ in range(steps):
        nxt = int(out.logits[0, -1].argmax())
        generated.append(nxt)
        if nxt == tok.eos_token_id:
            break
        out = model(**with_cache(model, {"input_ids": torch.tensor([[nxt]]), "use_cache": True}, output_cache(out)))
    return generated


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("masked", [True, False])
def test_identity_projection_matches_hand_loop(make, masked, tok):
    model = make(len(tok))
    reasoner = reasoner_for(model, tok, k=3, masked=masked)
    for q in QUESTIONS:  # single rows: no padding, so both mask modes equal the reference loop
        assert reasoner.run([q]).token_ids[0] == hand_loop(model, tok, q, 3, torch.nn.Identity(), 5)


def test_projection_and_batched_masked_equals_single(tok):
    model = tiny_llama(len(tok))
    torch.manual_seed(1)
    prj = CODIProjection(32, 48).eval()
    reasoner = reasoner_for(model, tok, k=4, projection=prj)
    batched = reasoner.run(QUESTIONS)
    for b, q in enumerate(QUESTIONS):
        single = reasoner.run([q])
        assert single.token_ids[0] == hand_loop(model, tok, q, 4, prj, 5)
        assert batched.token_ids[b] == single.token_ids[0]
        torch.testing.assert_close(batched.thought_hidden[b], single.thought_hidden[0], atol=1e-4, rtol=1e-4)


def test_unmasked_batch_differs_from_single_runs(tok):
    """Reference mode: padding is visible to latent steps, so a padded row's thoughts change."""
    model = tiny_llama(len(tok))
    reasoner = reasoner_for(model, tok, k=3, masked=False)
    batched = reasoner.run(QUESTIONS)
    single = reasoner.run([QUESTIONS[1]])  # shortest question: padded in the batch
    assert not torch.allclose(batched.thought_hidden[1], single.thought_hidden[0], atol=1e-4)


def test_layout_coordinates(tok):
    reasoner = reasoner_for(tiny_llama(len(tok)), tok, k=3)
    run = reasoner.run(QUESTIONS)
    lay = run.layout
    widths = [len(tok(q)["input_ids"]) + 1 for q in QUESTIONS]
    assert lay.width == max(widths)
    assert lay.cts == [lay.width, lay.width + 1, lay.width + 2]
    assert lay.eot == [lay.width + 3]
    assert lay.question(1) == list(range(lay.width - widths[1], lay.width - 1))
    assert run.thought_inputs.shape == (3, 3, 32) and run.thought_hidden.shape == (3, 3, 32)


# ---------------------------------------------------------------------------- blocking and edits
def test_blocking_nothing_changes_nothing(tok):
    reasoner = reasoner_for(tiny_llama(len(tok)), tok, k=3)
    base = reasoner.run(QUESTIONS)
    same = reasoner.run(QUESTIONS, attention_ops=[RecordAttention(layers=[0], steps="all")])
    empty_block = reasoner.run(QUESTIONS, attention_ops=block_thoughts([]))
    assert base.token_ids == same.token_ids == empty_block.token_ids
    torch.testing.assert_close(base.thought_hidden, empty_block.thought_hidden)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_blocked_thought_gets_zero_attention_at_every_step(make, tok):
    model = make(len(tok))
    reasoner = reasoner_for(model, tok, k=3)
    run = reasoner.run(QUESTIONS, attention_ops=lambda lay: [*block_thoughts([1])(lay),
                                                              RecordAttention(layers=[0, 1], steps="all")])
    ct1 = run.layout.ct(1)
    later_steps = [r for r in run.attention_records if r.query_offset > ct1]
    assert later_steps, "no forward after CT1 was recorded"
    for r in later_steps:  # CT2, eot, every fed answer token
        assert r.probs.shape[-1] > ct1 and float(r.probs[..., ct1].abs().max()) == 0.0
    at_ct1 = [r for r in run.attention_records if r.query_offset == ct1]
    assert float(at_ct1[0].probs[..., ct1].min()) > 0  # CT1 still attends to itself
    baseline = reasoner.run(QUESTIONS)
    assert not torch.allclose(run.thought_hidden[:, 2], baseline.thought_hidden[:, 2])
    torch.testing.assert_close(run.thought_hidden[:, :2], baseline.thought_hidden[:, :2])


def test_thought_edits(tok):
    model = tiny_llama(len(tok))
    prj = CODIProjection(32, 32).eval()
    reasoner = reasoner_for(model, tok, k=3, projection=prj)
    base = reasoner.run(QUESTIONS, capture_residual=True)
    zero = reasoner.run(QUESTIONS, edits=[ThoughtEdit(1, "embedding", "zero")])
    assert float(zero.thought_inputs[:, 1].abs().max()) == 0
    torch.testing.assert_close(zero.thought_inputs[:, 0], base.thought_inputs[:, 0])
    mean = base.thought_inputs[:, 1].mean(0)
    ablated = reasoner.run(QUESTIONS, edits=[ThoughtEdit(1, "embedding", "mean", mean)])
    torch.testing.assert_close(ablated.thought_inputs[:, 1], mean.expand(3, -1))
    # patching the hidden state of CT0 with its own value changes nothing; with another row's, CT1 input follows
    same = reasoner.run(QUESTIONS, edits=[ThoughtEdit(0, "hidden", "patch", base.thought_hidden[:, 0])])
    torch.testing.assert_close(same.thought_inputs, base.thought_inputs, atol=1e-5, rtol=1e-5)
    swapped = base.thought_hidden[:, 0].flip(0)
    moved = reasoner.run(QUESTIONS, edits=[ThoughtEdit(0, "hidden", "patch", swapped)])
    torch.testing.assert_close(moved.thought_inputs[:, 1], prj(swapped), atol=1e-5, rtol=1e-5)
    # residual patch at every block with the run's own states is a no-op; a single layer edit changes later states
    own = reasoner.run(QUESTIONS, edits=[ThoughtEdit(2, "residual", "patch", base.thought_residual[:, 2])],
                       capture_residual=True)
    torch.testing.assert_close(own.thought_residual, base.thought_residual, atol=1e-5, rtol=1e-5)
    z = reasoner.run(QUESTIONS, edits=[ThoughtEdit(2, "residual", "zero", layer=0)], capture_residual=True)
    assert float(z.thought_residual[:, 2, 0].abs().max()) == 0
    with pytest.raises(ValueError, match="needs a value"):
        ThoughtEdit(0, "embedding", "patch")
    with pytest.raises(ValueError, match="3 thoughts"):
        reasoner.run(QUESTIONS, edits=[ThoughtEdit(5)])


def test_explicit_cot_runner(tok):
    model = tiny_llama(len(tok))
    runner = ExplicitCoTRunner(model, tok, separator=",", answer_marker="=", max_new_tokens=8)
    base = runner.run(QUESTIONS)
    width = base.prompt_width
    for text, spans in zip(base.texts, base.thought_spans):
        parts = [p for p in text.split("=", 1)[0].split(",") if p.strip()]
        assert [len(s) for s in spans] == [len(p) + 1 for p in parts]  # char tokenizer: part + separator
        if spans:
            assert spans[0][0] >= width and all(b[0] == a[-1] + 1 for a, b in zip(spans, spans[1:]))
    blocked = runner.run(QUESTIONS, block=[0])
    assert len(blocked.answers) == 3
    unblocked = runner.run(QUESTIONS, block=[99])  # no such thought: nothing blocked, answer stage re-run
    for b, text in enumerate(base.texts):
        if "=" in text:  # the re-run answer stage continues the baseline's own text
            assert text.split("=", 1)[1].startswith(unblocked.texts[b]) or not unblocked.texts[b]


def test_last_number():
    assert last_number("so 3 then 1,250 apples.") == "1250"
    assert last_number("-4.0") == "-4"
    assert last_number("2.5 left") == "2.5"
    assert last_number("none") is None


# ---------------------------------------------------------------------------- CODI loader
def _random_lora(model, family: str, r: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name in lora_targets(model, family):
        w = dict(model.named_modules())[name].weight
        out_f, in_f = (w.shape[1], w.shape[0]) if family == "gpt2" else tuple(w.shape)
        lora[name] = {"A": torch.randn(r, in_f, generator=g) * 0.1, "B": torch.randn(out_f, r, generator=g) * 0.1}
    return lora


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_codi_loader_on_tiny_checkpoint(family, tmp_path, tok):
    vocab = len(tok)
    make = tiny_gpt2 if family == "gpt2" else tiny_llama
    model = make(vocab, seed=3)
    fresh = type(model.config)(**model.config.to_dict())  # the base config, before resizing
    model.resize_token_embeddings(vocab + 3, mean_resizing=False)
    r, alpha = 8, 32.0
    lora = _random_lora(model, family, r, seed=4)
    assert len(lora) == (4 if family == "gpt2" else 7) * 2  # gpt2: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    torch.manual_seed(5)
    prj = CODIProjection(32, 24).eval()
    save_codi_checkpoint(tmp_path, model, prj, lora)
    keys = set(split_state_dict(load_file(str(tmp_path / "model.safetensors")))[2])
    assert keys == {"1.weight", "1.bias", "3.weight", "3.bias", "ln.weight", "ln.bias"}

    loaded = load_codi(tmp_path, CODISpec(base="unused", lora_alpha=alpha, num_thoughts=3, max_new_tokens=5,
                                          attention_mask_in_latent=True), config=fresh, tokenizer=tok)
    # merged weights: W + alpha/r * B @ A (Conv1D transposed)
    name = next(iter(lora))
    expected = dict(model.named_modules())[name].weight.detach().clone()
    delta = lora[name]["B"] @ lora[name]["A"] * (alpha / r)
    expected += delta.T if family == "gpt2" else delta
    torch.testing.assert_close(dict(loaded.model.named_modules())[name].weight, expected)
    cfg = loaded.config
    assert cfg.bot_ids == [vocab + 1] and cfg.eot_ids == [vocab + 2] and cfg.pad_id == vocab
    assert cfg.answer_vocab_limit == vocab + 2
    # the loaded reasoner equals a hand-merged model run through the same runner
    with torch.no_grad():
        for n, ab in lora.items():
            d = ab["B"] @ ab["A"] * (alpha / r)
            dict(model.named_modules())[n].weight += d.T if family == "gpt2" else d
    manual = LatentReasoner(model, tok, cfg, prj)
    torch.testing.assert_close(loaded.run(QUESTIONS).thought_hidden, manual.run(QUESTIONS).thought_hidden,
                               atol=1e-4, rtol=1e-4)


def test_codi_loader_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="exactly one"):
        load_codi(tmp_path, CODISpec(base="unused"), config=tiny_llama(10).config, tokenizer=tok)


# ---------------------------------------------------------------------------- data
def test_generated_problems_and_gsm8k(tmp_path):
    problems = generate_problems(50, seed=1, style="compact")
    assert len({p.question for p in problems}) == 50
    for p in problems:
        assert 2 <= p.n_ops <= 4 and p.question == render_compact(p.start, p.ops, p.args)
        steps = chain(p.start, p.ops, p.args)
        assert p.gold == str(steps[-1]) and p.intermediates == [str(v) for v in steps[:-1]]
        assert all(0 <= v < 100 for v in steps)
    train = generate_problems(50, seed=1, split="train")
    assert not {p.question for p in train} & {p.question for p in generate_problems(50, seed=1)}
    rec = {"question": "A has 3 bags of 4. How many?", "answer": "3*4=<<3*4=12>>12\n12/2=<<12/2=6>>6\n#### 1,006"}
    p = gsm8k_problem(rec, 0)
    assert p.gold == "1006" and p.intermediates == ["12", "6"] and p.ops == ["mul", "div"]
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    assert len(load_gsm8k(path)) == 2
    with pytest.raises(ValueError, match="####"):
        gsm8k_problem({"question": "q", "answer": "5"}, 0)


# ---------------------------------------------------------------------------- taxonomy
@pytest.mark.parametrize("text,parsed,expected", [
    ("", None, "NONE"), ("   ", None, "NONE"), ("abc", None, "NONSENSE"),
    ("24", "24", "CORRECT"), ("24.0", "24.0", "CORRECT"),
    ("12", "12", "PARTIAL_ANSWER"), ("-24", "-24", "SIGN_ERROR"),
    ("48", "48", "OFF_BY_FACTOR"), ("240", "240", "OFF_BY_FACTOR"), ("6", "6", "OFF_BY_FACTOR"),
    ("25", "25", "CALC_ERROR"), ("26", "26", "CALC_ERROR"), ("34", "34", "CALC_ERROR"),
    ("97", "97", "LOGIC_ERROR"),
])
def test_taxonomy_rules(text, parsed, expected):
    # problem: 6 * 2 = 12 (intermediate), 12 * 2 = 24 (gold)
    assert classify(text, parsed, "24", ["12"]) == expected


def test_operation_reversal():
    # 5 + 3 = 8, 8 * 2 = 16; reversing step 1 gives (5 - 3) * 2 = 4, step 2: 8 / 2 = 4
    rev = reversal_results(5, ["add", "mul"], [3, 2])
    assert rev == [4.0, 4.0]
    assert classify("4", "4", "16", ["8"], rev) == "OPERATION_REVERSAL"
    rev = reversal_results(9, ["sub", "add"], [2, 30])  # 9+2+30 = 41, 9-2-30 = -23
    assert classify("41", "41", "37", ["7"], rev) == "OPERATION_REVERSAL"


def test_taxonomy_report_and_bootstrap():
    rows = [{"condition": "baseline", "problem_id": i, "category": "CORRECT"} for i in range(40)]
    rows += [{"condition": "block", "problem_id": i, "category": "PARTIAL_ANSWER" if i < 20 else "CORRECT"}
             for i in range(40)]
    report = taxonomy_report(pd.DataFrame(rows), n_boot=500)
    change = report["conditions"]["block"]["change_vs_baseline"]
    assert change["CORRECT"]["diff"] == pytest.approx(-0.5) and change["CORRECT"]["ci_high"] < 0
    assert change["PARTIAL_ANSWER"]["ci_low"] > 0 and change["NONE"]["diff"] == 0
    assert sum(report["conditions"]["block"]["distribution"].values()) == pytest.approx(1)
    diff, low, high = paired_bootstrap_diff(np.zeros(10), np.zeros(10))
    assert diff == low == high == 0


# ---------------------------------------------------------------------------- features and statistics
def test_problem_features():
    f = problem_features("7+4-2*3/2=", ["add", "sub", "mul", "div"], tokenize=list)
    assert f == {"n_tokens": 10.0, "n_operations": 4.0, "n_operation_types": 4.0, "max_number": 7.0,
                 "multi_step": 1.0, "has_division": 1.0, "has_multiplication": 1.0, "has_fractions": 1.0}
    g = problem_features("Tom has 3 apples. He buys 12 more. How many apples?")
    assert g["n_operations"] == 1 and g["multi_step"] == 0 and g["max_number"] == 12 and g["has_fractions"] == 0
    h = problem_features("She eats half of 1,200 cookies, then doubles the rest.")
    assert h["has_division"] == 1 and h["has_multiplication"] == 1 and h["has_fractions"] == 1
    assert h["max_number"] == 1200


def test_correlations_and_pvalues():
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = 0.5 * x + rng.normal(size=60)
    r, p = correlation(x, y)
    assert r == pytest.approx(np.corrcoef(x, y)[0, 1])
    rho, p_rho = correlation(x, y, "spearman")
    assert correlation(x, np.ones(60)) == (None, None)
    assert correlation(np.ones(60), y, "spearman") == (None, None)
    stats = pytest.importorskip("scipy.stats")
    ref = stats.pearsonr(x, y)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    assert p_rho == pytest.approx(stats.spearmanr(x, y).pvalue, rel=1e-9)
    assert correlation(x, -x)[1] == 0.0

    def t_test(a, b):  # the textbook route, independent of pearsonr's beta distribution: t = r·sqrt(df/(1-r²))
        c = np.corrcoef(a, b)[0, 1]
        df = len(a) - 2
        return c, 2 * stats.t.sf(abs(c) * np.sqrt(df / (1 - c * c)), df)

    for n in (3, 4, 10, 300):
        a = rng.integers(0, 4, n).astype(float) if n == 10 else rng.normal(size=n)  # n = 10: ties
        b = 0.3 * a + rng.normal(size=n)
        for method, (ra, rb) in (("pearson", (a, b)),
                                 ("spearman", (pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()))):
            got, want = correlation(a, b, method), t_test(ra, rb)
            assert got == pytest.approx(want, rel=1e-9, abs=1e-15), (n, method)
    with pytest.raises(ValueError):
        correlation([1.0, 2.0], [2.0, 1.0])
    with pytest.raises(ValueError):
        correlation(x, y, "kendall")


def test_sensitivity_report():
    idx = [f"p{i}" for i in range(30)]
    n_ops = pd.Series([2, 3, 4] * 10, index=idx, dtype=float)
    features = pd.DataFrame({"n_operations": n_ops, "has_division": 0.0}, index=idx)
    impact = (n_ops == 4).astype(float)
    rep = sensitivity_report(features, impact, n_ops.astype(int).astype(str))
    assert rep["correlations"]["n_operations"]["pearson_r"] > 0.8
    assert rep["correlations"]["n_operations"]["pearson_p"] < 1e-6
    assert rep["correlations"]["has_division"]["pearson_r"] is None
    assert rep["impact_by_type"]["4"]["mean_impact"] == 1 and rep["impact_by_type"]["2"]["mean_impact"] == 0
    assert rep["high_vs_low_impact_means"]["n_operations"] == {"high": 4.0, "low": 2.5}


# ---------------------------------------------------------------------------- one-command run
@pytest.mark.slow
def test_study_smoke_run(tmp_path):
    """The old one-command study (deprecated) runs through the study runner: one study folder per number of
    operations, the blocking study in the first."""
    from tasks.ct_positions.organism import ORGANISM_DIR
    from tasks.ct_positions.study import main

    if not (ORGANISM_DIR / "latent_config.json").exists():
        pytest.skip("organism not trained")
    with pytest.warns(DeprecationWarning, match="python -m experiments.study --task ct_positions"):
        folders = main(["--out", str(tmp_path), "--n-problems", "60", "--patching-size", "8"])
    assert folders == [tmp_path / f"{n}ops" for n in (2, 3, 4)]
    blocking = tmp_path / "2ops" / "analyses" / "blocking"
    frame = pd.read_parquet(blocking / "predictions.parquet")
    assert len(frame) == 60 * 7 and set(frame["condition"]) == {"baseline", *[f"block_ct{j}" for j in range(6)]}
    assert {"problem_id", "question", "gold", "generated_text", "parsed_answer", "correct", "category"} <= set(frame)
    for name in ("taxonomy.json", "taxonomy_summary.json", "sensitivity.json", "taxonomy.png",
                 "sensitivity_scatter.png"):
        assert (blocking / name).exists(), name
    n_ops = set()
    for folder in folders:
        assert (folder / "report.md").exists() and (folder / "scores" / "summary.md").exists()
        n_ops |= set(json.loads((folder / "analyses" / "ct_patching" / "ct_scores.json").read_text())["n_ops"])
    assert n_ops == {"2", "3", "4"}


def test_old_entry_point_translates_its_options():
    from tasks.ct_positions import study

    runs = study.runner_arguments(["--out", "o", "--n-problems", "60", "--patching-size", "8"])
    assert [r[r.index("--n-ops") + 1] for r in runs] == ["2", "3", "4"]
    assert "--steps" not in runs[0] and runs[1][-5:] == ["--steps", "filter", "ct_patching", "score", "report"]
    assert runs[0][:2] == ["--out", "o/2ops"] and runs[0][runs[0].index("--size") + 1] == "8"
    (only,) = study.runner_arguments(["--codi-checkpoint", "ck", "--codi-base", "gpt2", "--gsm8k", "g.jsonl"])
    assert only[-4:] == ["--steps", "filter", "blocking", "report"] and only[only.index("--model") + 1] == "ck"
    assert only[only.index("--style") + 1] == "words" and only[1] == "results/ct_positions/ck"
