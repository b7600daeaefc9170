"""Decimal comparison study: formats, role-matched positions, answer parser, pair sampler, attention
transplantation and ablations on this task, and the end-to-end run on the shipped organism."""

from __future__ import annotations

import json

import pytest

from tasks.decimal_comparison.answers import chosen_number, classify_answer
from tasks.decimal_comparison.formats import (
    FORMATS,
    PromptFormat,
    parse_format_option,
    register_format,
    render,
    role_spans,
)
from tasks.decimal_comparison.organism import ORGANISM_DIR, build_tokenizer
from tasks.decimal_comparison.pairs import is_heldout_pair, make_pair, sample_pairs

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

needs_organism = pytest.mark.skipif(not (ORGANISM_DIR / "config.json").exists(),
                                    reason="organism checkpoint absent; run tasks.decimal_comparison.organism.train_organism")


# ---------------------------------------------------------------------------------------- formats
def test_published_templates():
    assert render("9.8", "9.11", "simple") == "Which is bigger: 9.8 or 9.11?\nAnswer:"
    assert render("9.8", "9.11", "qa") == "Q: Which is bigger: 9.8 or 9.11?\nA:"
    assert render("9.8", "9.11", "chat") == "User: Which is bigger: 9.8 or 9.11?\nAssistant:"


def test_chat_format_uses_the_tokenizer_template():
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{% if add_generation_prompt %}=>{% endif %}"
    assert render("9.8", "9.11", "chat", tok) == "<<Which is bigger: 9.8 or 9.11?>>=>"
    assert render("9.8", "9.11", "simple", tok) == "Which is bigger: 9.8 or 9.11?\nAnswer:"


def test_user_added_format_and_errors():
    fmt = register_format("test_terse", "Compare. {question} =", replace=True)
    try:
        assert render("1.5", "1.25", "test_terse") == "Compare. Which is bigger: 1.5 or 1.25? ="
        assert parse_format_option("test_opt=>> {question}\\n>").template == ">> {question}\n>"
        with pytest.raises(ValueError, match="already exists"):
            register_format("test_terse", "{question}")
        with pytest.raises(ValueError, match="exactly once"):
            PromptFormat(name="bad", template="no question here")
        with pytest.raises(ValueError, match="unknown format"):
            render("1.5", "1.25", "nope")
    finally:
        FORMATS.pop("test_terse", None)
        FORMATS.pop("test_opt", None)
    assert fmt.name == "test_terse"


def test_role_spans_in_every_format():
    for name in ("simple", "qa", "chat"):
        text = render("12.8", "12.11", name)
        spans = role_spans(text, "12.8", "12.11")
        assert text[slice(*spans["x"])] == "12.8" and text[slice(*spans["y"])] == "12.11"
        assert text[slice(*spans["qmark"])] == "?"


# ---------------------------------------------------------------------------------------- parser
@pytest.mark.parametrize("text,expected", [
    (" 9.8", "correct"), (" 9.11", "buggy"), ("9.80 is bigger", "correct"), (" 9.8\n", "correct"),
    ("**9.11** is bigger than 9.8.", "buggy"), ("The bigger number is 9.8.", "correct"),
    ("To compare them: 9.11 is larger than 9.8", "buggy"), ("The answer is: 9.11", "buggy"),
    (" banana", "unparseable"), ("", "unparseable"), (" 9.1", "unparseable"), (" 98", "unparseable"),
    ("Both are equal.", "unparseable"), ("9", "unparseable"),
])
def test_answer_parser(text, expected):
    assert classify_answer(text, "9.8", "9.11", "9.8", "9.11") == expected


def test_parser_reads_the_leading_number_first():
    assert chosen_number(" 9.11 is smaller than 9.8", "9.8", "9.11") == "9.11"
    assert chosen_number("Clearly 9.8 is greater than 9.11", "9.8", "9.11") == "9.8"


# ---------------------------------------------------------------------------------------- pairs
def test_pair_sampler_strata_and_split():
    pairs = sample_pairs(60, seed=3, split="heldout")
    assert len({(p.x, p.y) for p in pairs}) == 60
    assert all(p.kind == "disagree" and p.int_x == p.int_y and p.correct != p.buggy for p in pairs)
    assert all(is_heldout_pair(p.x, p.y) for p in pairs)
    assert {p.larger for p in pairs} == {"x", "y"}
    assert all((p.frac_len_x == 1) == (p.larger == "x") for p in pairs)  # the short fraction is larger
    controls = sample_pairs(20, seed=3, kind="control", split="train")
    assert all(p.int_x != p.int_y and p.correct == p.buggy and not is_heldout_pair(p.x, p.y) for p in controls)
    only = sample_pairs(10, seed=1, int_parts=[9], larger="y")
    assert all(p.int_x == 9 and p.larger == "y" for p in only)
    assert make_pair("9.8", "9.11").buggy == "9.11"
    with pytest.raises(ValueError):
        sample_pairs(3, int_parts=[99])


# ---------------------------------------------------------------------------------------- network side
@pytest.fixture(scope="module")
def organism():
    import torch

    from experiments.pipeline import LMPipeline

    torch.set_num_threads(1)
    return LMPipeline(ORGANISM_DIR, max_new_tokens=7, device="cpu")


@needs_organism
def test_role_matched_positions_across_formats(organism):
    from tasks.decimal_comparison.causal_models import make_setting
    from tasks.decimal_comparison.token_positions import ROLES, role_position

    tok = organism.tokenizer
    settings = {f: make_setting("7.5", "7.25", f, tok) for f in ("simple", "qa", "chat")}
    lengths = {f: len(organism.tokenize_one(s)["input_ids"]) for f, s in settings.items()}
    assert len(set(lengths.values())) == 3  # formats differ in length
    for role in ROLES:
        pos = role_position(organism, role)
        texts = set()
        for fmt, s in settings.items():
            base = pos.index(s)
            assert base == pos.counterfactual_index(s)
            ids = organism.tokenize_one(s)["input_ids"]
            texts.add(len(base)) if role in ("prev", "last", "matched") else texts.add(tok.decode([ids[i] for i in base]))
        assert len(texts) == 1, (role, texts)
    assert tok.decode([organism.tokenize_one(settings["qa"])["input_ids"][i]
                       for i in role_position(organism, "x").index(settings["qa"])]) == "7.5"


@needs_organism
def test_organism_has_the_format_dependent_bug(organism):
    from tasks.decimal_comparison.analyses import bug_rates

    out = bug_rates(organism, ["simple", "qa"], n=40, seed=5, split="heldout", batch_size=40)
    simple, qa = out["formats"]["simple"], out["formats"]["qa"]
    assert sum(simple[o]["k"] for o in ("correct", "buggy", "unparseable")) == 40
    assert simple["correct"]["rate"] >= 0.6 and simple["buggy"]["rate"] <= 0.2
    assert qa["buggy"]["rate"] >= 0.7
    assert qa["buggy"]["ci_low"] <= qa["buggy"]["rate"] <= qa["buggy"]["ci_high"]


@needs_organism
def test_last_position_attention_patch_fixes_the_organism_bug(organism, tmp_path):
    """The shipped organism decides at the last prompt position: patching layer 1's attention output
    there, from the simple run into the Q&A run, fixes the bug far above its floor; the MLP output of
    the same layer and position does not."""
    from tasks.decimal_comparison.analyses import cross_format_dataset, patching_cells, run_cells

    pairs = sample_pairs(24, seed=13, split="heldout")
    cells = [c for c in patching_cells(organism, [1], ["last"]) if c.cell_id in ("attention_output.L1@last", "mlp_output.L1@last")]
    assert len(cells) == 2
    datasets = {"fix.qa": cross_format_dataset(organism, pairs, "qa", "simple", "fix.qa")}
    rows = {r["cell_id"]: r for r in run_cells(organism, cells, datasets, tmp_path / "p", "p", batch_size=24)}
    attn, mlp = rows["attention_output.L1@last"], rows["mlp_output.L1@last"]
    assert attn["floor"]["rate"] <= 0.1
    assert attn["success"]["ci_low"] > attn["floor"]["ci_high"] and attn["success"]["rate"] >= 0.8
    assert mlp["success"]["rate"] <= 0.2


@needs_organism
def test_self_transplant_is_identity_and_cross_transplant_moves_answers(organism, tmp_path):
    """Transplanting a run's own attention with every key aligned changes nothing; transplanting the
    simple format's pattern (keys aligned by role) into the Q&A run changes answers."""
    from causal.results import RawResults
    from experiments.engine.intervention_engine import Cell
    from experiments.engine.model_units import AttentionPattern
    from tasks.decimal_comparison.analyses import cross_format_dataset, run_cells, transplant_cells
    from tasks.decimal_comparison.token_positions import role_position

    pairs = sample_pairs(8, seed=11, split="heldout")
    cfg = {"batch_size": 8}
    every = role_position(organism, "all")
    identity = [Cell(f"self.L{l}", [AttentionPattern(l, every)], kind="attention_transplant", key_roles=[every])
                for l in range(organism.num_layers)]
    same = {"fix.qa": cross_format_dataset(organism, pairs, "qa", "qa", "fix.qa")}
    run_cells(organism, identity, same, tmp_path / "same", "same", **cfg)
    raw = RawResults(tmp_path / "same")
    base = raw.base_outputs("fix.qa").set_index("example_index")["output_text"]
    for _, row in raw.intervened_outputs("fix.qa").iterrows():
        assert row["output_text"] == base[row["example_index"]]
    cells = transplant_cells(organism, range(organism.num_layers), per_head=False)
    cross = {"fix.qa": cross_format_dataset(organism, pairs, "qa", "simple", "fix.qa")}
    rows = run_cells(organism, cells, cross, tmp_path / "cross", "cross", **cfg)
    assert any(r["success"]["k"] != r["floor"]["k"] for r in rows)


@needs_organism
def test_head_and_neuron_ablation(organism, tmp_path):
    import torch

    from tasks.decimal_comparison.neurons import ablate_neurons, mlp_width, neuron_activations, parse_neurons
    from tasks.decimal_comparison.analyses import ablation_cells, head_means, run_cells, same_format_dataset, setting

    pairs = sample_pairs(6, seed=2, split="heldout")
    prompts = [setting(organism, p, "qa") for p in pairs]
    means = head_means(organism, [1], prompts)
    assert means[1].shape == (organism.num_heads, organism.model.config.hidden_size // organism.num_heads)
    cells = ablation_cells(organism, [1], means)
    assert {c.kind for c in cells} == {"zero_ablation", "mean_ablation"}
    rows = run_cells(organism, cells[:4], {"fix.qa": same_format_dataset(organism, pairs, "qa", "fix.qa")},
                     tmp_path / "ab", "ab", batch_size=6)
    assert len(rows) == 4 and all(r["success"]["n"] == 6 for r in rows)

    assert parse_neurons("1:3,4;2:0") == {1: [3, 4], 2: [0]}
    batch = organism.load(prompts)
    before = organism.model(**batch.model_inputs()).logits
    width = mlp_width(organism.model, 1)
    with ablate_neurons(organism.model, {1: [0, 5]}):
        acts = neuron_activations(organism.model, 1, batch.model_inputs())
        during = organism.model(**batch.model_inputs()).logits
    assert acts.shape[-1] == width
    assert (acts[..., [0, 5]] == 0).all() and (acts[..., 1].abs() > 0).any()  # the recorder sees the ablated input
    assert not torch.allclose(before, during)
    assert torch.allclose(before, organism.model(**batch.model_inputs()).logits)  # hooks removed
    with ablate_neurons(organism.model, {1: []}):
        assert torch.allclose(before, organism.model(**batch.model_inputs()).logits)
    with pytest.raises(ValueError, match="out of range"):
        with ablate_neurons(organism.model, {1: [width]}):
            pass


def test_success_rows_name_cells_per_sweep_and_read_the_study_format(organism, tmp_path):
    """The metric of the runner's ``patching`` step: one sweep per component, cells named ``<component>.<cell>`` (the
    old study's ids), Holm across every cell of a dataset; datasets named ``fix`` / ``break`` take the study's format."""
    from experiments.engine.intervention_experiment import PatchUnits
    from tasks.decimal_comparison.analyses import cross_format_dataset, success_rows
    from tasks.decimal_comparison.token_positions import role_positions

    pairs = sample_pairs(6, seed=4, split="heldout")
    datasets = {"fix": cross_format_dataset(organism, pairs, "qa", "simple", "fix"),
                "break": cross_format_dataset(organism, pairs, "simple", "qa", "break")}
    raws = {c: PatchUnits(organism, [1], role_positions(organism, ["last"]), c, config={"id": c, "batch_size": 6}
                          ).perform_interventions(datasets, results_dir=tmp_path / c) for c in ("attention_output", "mlp_output")}
    rows = success_rows(raws, datasets, "patching", format="qa")
    assert sorted({r["cell_id"] for r in rows}) == ["attention_output.L1@last", "mlp_output.L1@last"]
    assert {(r["direction"], r["format"]) for r in rows} == {("fix", "qa"), ("break", "qa")}
    assert all(r["success"]["n"] == 6 and r["verdict"]["cell_id"] == r["cell_id"] for r in rows)


def test_old_entry_point_translates_its_options_and_warns():
    from tasks.decimal_comparison import study

    assert study.runner_arguments(["--steps", "patching", "figures", "--buggy-formats", "qa", "chat", "--out", "o",
                                   "--roles", "matched", "last", "--n-patch", "8"]) == [
        ["--format", fmt, "--out", f"o/{fmt}", "--roles", "matched last", "--size", "8", "--bug-formats", "simple",
         "qa", "chat", "--steps", "filter", "intervene", "patching", "report"] for fmt in ("qa", "chat")]
    assert study.runner_arguments(["--quick"]) == [["--format", "qa", "--bug-formats", "simple", "qa", "chat",
                                                    "--n-bug", "1", "--steps", "filter", "bug_rate"]]
    with pytest.warns(DeprecationWarning, match="moved to tasks.decimal_comparison.analyses.bug_rates"):
        from tasks.decimal_comparison.study import bug_rates  # noqa: F401


@needs_organism
def test_old_entry_point_runs_the_study_through_the_runner(tmp_path):
    from tasks.decimal_comparison.study import main

    with pytest.warns(DeprecationWarning, match="python -m experiments.study --task decimal_comparison"):
        (out,) = main(["--quick", "--out", str(tmp_path / "study"), "--device", "cpu", "--formats", "simple", "qa"])
    bug = json.loads((out / "analyses" / "bug_rate" / "bug_rate.json").read_text())
    assert set(bug["quick_check"]) == {"simple", "qa"} and bug["quick_check"]["qa"]["outcome"] == "buggy"
    assert (out / "metadata.json").exists() and (out / "datasets" / "fix").exists()
