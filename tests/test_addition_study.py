"""The addition task on the shipped organism: token positions, filtering, and the three-step study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from causal.results import RawResults
from experiments.engine.filter_experiment import FilterExperiment
from experiments.pipeline import LMPipeline
from experiments.token_positions import TokenPositionError
from tasks.general_addition.causal_models import (
    build_addition_model,
    build_tens_without_carry_model,
    setting_from_addends,
)
from tasks.general_addition.checker import addition_checker
from tasks.general_addition.counterfactuals import make_addition_datasets
from tasks.general_addition.organism import ORGANISM_DIR
from tasks.general_addition.token_positions import addition_token_positions, tokenization_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def organism() -> LMPipeline:
    return LMPipeline(ORGANISM_DIR, max_new_tokens=5, device="cpu")


def test_digit_positions_on_character_tokenizer(organism):
    positions = {p.id: p for p in addition_token_positions(organism, 2)}
    setting = setting_from_addends(58, 67, 2)
    # "<s> 5 8 + 6 7 =": BOS at 0
    expected = {"digit_0_1": [1], "digit_0_0": [2], "op": [3], "digit_1_1": [4], "digit_1_0": [5], "last": [6]}
    assert {k: positions[k].index(setting) for k in positions} == expected  # "=" is the last token: no "eq"
    assert tokenization_of(organism) == "one_token_per_digit"


def test_positions_follow_other_templates(organism):
    positions = {p.id: p for p in addition_token_positions(organism, 3, template="plus_words")}
    setting = setting_from_addends(123, 456, 3, template="plus_words")  # "What is 123 plus 456? Answer:"
    text = setting["raw_input"]
    assert positions["digit_0_2"].index(setting) == [1 + text.index("1")]
    assert positions["digit_1_0"].index(setting) == [1 + text.index("6")]
    assert positions["eq"].index(setting) == [1 + text.index("?")]


def _chunking_pipeline(tmp_path: Path) -> LMPipeline:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for token in [str(i) for i in range(1000)] + [f"{i:02d}" for i in range(100)] + [f"{i:03d}" for i in range(100)] + list("+=? abcdefghijklmnopqrstuvwxyzAQ:"):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d{1,3}|."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(vocab), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    folder = tmp_path / "chunky"
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return LMPipeline(folder, device="cpu")


def test_multi_digit_tokens_give_addend_positions(tmp_path):
    pipeline = _chunking_pipeline(tmp_path)
    assert tokenization_of(pipeline) == "multi_digit_tokens"
    positions = {p.id: p for p in addition_token_positions(pipeline, 3)}
    assert list(positions) == ["addend_0", "op", "addend_1", "last"]
    setting = setting_from_addends(123, 456, 3)  # "<s> 123 + 456 ="
    assert [positions[k].index(setting) for k in positions] == [[1], [2], [3], [4]]
    qa = {p.id: p for p in addition_token_positions(pipeline, 3, template="qa")}
    assert qa["eq"].index(setting_from_addends(123, 456, 3, template="qa")) == [7]  # "<s> Q :   123 + 456 ="


def test_position_outside_prompt_is_an_error(organism):
    from experiments.token_positions import TokenPosition

    beyond = TokenPosition(lambda s: [40], organism, id="beyond")
    with pytest.raises(TokenPositionError, match="has 7 tokens"):
        beyond.index(setting_from_addends(58, 67, 2))


@pytest.mark.slow
def test_filter_keeps_pairs_the_organism_gets_right(organism):
    datasets = make_addition_datasets(2, 24, seed=3, families=["random", "flip_carry_0"])
    kept, reports = FilterExperiment(organism, build_addition_model(2), addition_checker).filter(datasets, verbose=False)
    for report in reports:
        assert report.input_accuracy >= 0.95
        assert len(kept[report.dataset_id]) == report.kept_pairs >= 20
    # against a wrong hypothesis the same network "fails" exactly where the hypothesis is wrong
    _, wrong = FilterExperiment(organism, build_tens_without_carry_model(2), addition_checker).filter(
        {"flip_carry_0": datasets["flip_carry_0"]}, verbose=False)
    assert wrong[0].kept_pairs == 0  # every flip_carry_0 pair has carry_0 = 1 on one side


@pytest.mark.slow
def test_run_all_test_mode_end_to_end(tmp_path):
    study = tmp_path / "study"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "tasks/general_addition/run_all.sh"), "--test", "--digits", "2", "--out", str(study), "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metadata = json.loads((study / "metadata.json").read_text())
    assert metadata["datasets"]
    raw = RawResults(study / "raw" / "residual_stream")
    assert raw.is_complete()
    table = raw.intervened_outputs()
    assert set(table["layer"]) == {-1, 0, 1, 2, 3}
    summary = (study / "scores" / "summary.md").read_text()
    assert "digit_0_0" in summary and "carry_0" in summary
    assert list((study / "scores" / "heatmaps" / "residual_stream").glob("*.png"))
    assert list((study / "scores" / "heatmaps" / "attention_heads").glob("*.png"))
    # Law: patching the embedding of a digit token is the same as changing that input digit, so the
    # carry graph's label for that digit must match the organism wherever it adds correctly.
    scores = json.loads((study / "scores" / "residual_stream__carry.json").read_text())
    rows = [r for r in scores["pooled"] if r["target_variables"] == "digit_0_0" and r["cell_id"] == "L-1@digit_0_0"]
    assert rows and rows[0]["accuracy"] >= 0.9 and rows[0]["informative_accuracy"] >= 0.9
    assert [e["id"] for e in metadata["experiments"]] == ["residual_stream", "attention_heads"]
    assert "## Scores (step 3)" in (study / "report.md").read_text()  # run_all.sh is the study runner


def test_chat_template_keeps_eq_and_shifts_positions():
    pipeline = LMPipeline(ORGANISM_DIR, device="cpu", use_chat_template=True)
    pipeline.tokenizer.chat_template = "q {{ messages[0]['content'] }} a"
    setting = setting_from_addends(58, 67, 2)  # tokenised text: "q 58+67= a" (no BOS with a chat template)
    positions = {p.id: p for p in addition_token_positions(pipeline, 2)}
    assert "eq" in positions  # "=" is no longer the last token
    assert positions["digit_0_1"].index(setting) == [2]
    assert positions["eq"].index(setting) == [7]
    assert positions["last"].index(setting) == [9]


@pytest.mark.slow
def test_scoring_step_needs_no_torch(tmp_path):
    """Step 3 scores a finished study without importing torch (no model, no GPU needed)."""
    study = tmp_path / "study"
    env = {**os.environ, "PYTHON": sys.executable}
    for step in ("01_generate_and_filter_dataset.py", "02_run_interventions.py"):
        subprocess.run([sys.executable, str(REPO / "tasks/general_addition" / step), "--test", "--out", str(study),
                        "--device", "cpu", "--layers", "0", "--no-heads", "--families", "random"],
                       cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    code = (
        "import runpy, sys, io, contextlib\n"
        f"sys.argv = ['03', '--results', {str(study)!r}]\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    runpy.run_path({str(REPO / 'tasks/general_addition/03_compute_scores_and_visualize.py')!r}, run_name='__main__')\n"
        "assert 'torch' not in sys.modules, 'step 3 imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=600)
    assert (study / "scores" / "summary.md").exists()


# ---------------------------------------------------------------- step 3 on a hand-written study (no network)

import importlib.util  # noqa: E402
import shutil  # noqa: E402

from causal.results import CellSpec, DatasetRecord, RawResultsWriter, ResultsManifest, UnitAddress  # noqa: E402

STEP3 = REPO / "tasks/general_addition/03_compute_scores_and_visualize.py"


def _step3():
    spec = importlib.util.spec_from_file_location("addition_step3", STEP3)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_study(folder: Path, positions=("digit_0_0", "last"), model_name: str = "addition-llama") -> Path:
    """A study with two small families and one residual-stream experiment whose outputs are written by hand:
    the cell at the first position answers as if its digit(s) were interchanged, the other cell changes nothing."""
    carry = build_addition_model(2)
    datasets = make_addition_datasets(2, 8, seed=1, families=["random", "flip_carry_0"], model=carry)
    for name, dataset in datasets.items():
        dataset.save(folder / "datasets" / name)
    moved = ["digit_0_1", "digit_0_0"] if positions[0] == "addend_0" else ["digit_0_0"]
    cells = [CellSpec(cell_id=f"L-1@{positions[0]}", units=[UnitAddress(layer=-1, component="block_output", position_id=positions[0])]),
             CellSpec(cell_id=f"L0@{positions[1]}", units=[UnitAddress(layer=0, component="block_output", position_id=positions[1])])]
    manifest = ResultsManifest(
        experiment_id="residual_stream", experiment_type="patch_residual_stream",
        model={"name": model_name, "use_chat_template": False},
        datasets=[DatasetRecord(dataset_id=d.id, fingerprint=d.fingerprint(), size=len(d)) for d in datasets.values()],
        cells=cells, example_batch_size=8, cell_groups=[[c.cell_id for c in cells]])
    writer = RawResultsWriter(folder / "raw" / "residual_stream", manifest)

    def row(i, text, **extra):
        return {**extra, "example_index": i, "output_text": text, "output_token_ids": [1], "topk_token_ids": [[1]],
                "topk_logits": [[0.0]]}

    for dataset in datasets.values():
        base = carry.label_data(dataset)
        patched = carry.label_counterfactual_data(dataset, moved)
        cell_rows = [row(i, patched[i], cell_id=cells[0].cell_id) for i in range(len(dataset))]
        cell_rows += [row(i, base[i], cell_id=cells[1].cell_id) for i in range(len(dataset))]
        writer.write_part(dataset.id, 0, [row(i, base[i]) for i in range(len(dataset))], cell_rows)
    metadata = {"model": "organism", "digits": 2, "seed": 1, "size": 8, "template": "compact", "families": None,
                "pairs_per_family": 8, "chat": False, "test": True, "datasets": list(datasets),
                "filter": [{"dataset_id": d, "input_accuracy": 1.0, "kept_pairs": 8, "total_pairs": 8} for d in datasets],
                "experiments": [{"id": "residual_stream", "type": "patch_residual_stream", "folder": "raw/residual_stream"}]}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def test_step3_scores_listed_experiments_into_a_fresh_folder(tmp_path):
    study = _write_study(tmp_path / "study")
    (study / "scores").mkdir()
    (study / "scores" / "stale_from_an_old_run.json").write_text("{}")
    shutil.copytree(study / "raw" / "residual_stream", study / "raw" / "residual_stream_backup")
    out = _step3().main(["--results", str(study)])
    assert out == study / "scores"
    assert not (out / "stale_from_an_old_run.json").exists()  # replaced as a whole, no mix of old and new
    assert not list(study.glob(".scores*"))  # no temporary folder left behind
    assert sorted(p.name for p in out.glob("*.json")) == [
        "residual_stream__carry.json", "residual_stream__carry__verdicts.json", "residual_stream__controls__verdicts.json",
        "residual_stream__tens_no_carry.json", "residual_stream__tens_no_carry__verdicts.json"]
    summary = (out / "summary.md").read_text()
    assert "ignored `raw/residual_stream_backup`" in summary
    assert "| digit_0_0 | `L-1@digit_0_0` |" in summary  # patched cell moves the answer on every informative pair
    assert "| digit_0_1 | no cell carries it" in summary  # that cell holds the ones digit only
    assert "`digit_0_0` at `L-1@digit_0_0` (best cell):" in summary and "| flip_carry_0 |" in summary
    assert list((out / "heatmaps" / "residual_stream").glob("*.png"))
    scores = json.loads((out / "residual_stream__carry.json").read_text())
    row = next(r for r in scores["pooled"] if r["target_variables"] == "digit_0_0" and r["cell_id"] == "L0@last")
    assert row["n_informative_correct"] == 0 and row["accuracy"] == row["floor"]  # changes nothing: IIA = floor


def test_step3_target_vars_go_to_their_own_folder(tmp_path):
    study = _write_study(tmp_path / "study")
    default = _step3().main(["--results", str(study)])
    before = (default / "summary.md").read_text()
    out = _step3().main(["--results", str(study), "--target-vars", "carry_0"])
    assert out == study / "scores_carry_0"
    assert (default / "summary.md").read_text() == before
    assert "| carry_0 |" in (out / "summary.md").read_text() and "| digit_0_0 |" not in (out / "summary.md").read_text()


def test_step3_refuses_missing_or_foreign_results(tmp_path):
    step3 = _step3()
    study = _write_study(tmp_path / "missing")
    metadata = json.loads((study / "metadata.json").read_text())
    metadata["experiments"].append({"id": "attention_heads", "type": "patch_attention_heads", "folder": "raw/attention_heads"})
    (study / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(SystemExit, match="'attention_heads' is listed .* holds no manifest.json"):
        step3.main(["--results", str(study)])
    assert not (study / "scores").exists() and not list(study.glob(".scores*"))

    other = _write_study(tmp_path / "other_model", model_name="gpt2")
    with pytest.raises(SystemExit, match="computed on model 'gpt2'.*'organism'"):
        step3.main(["--results", str(other)])

    regenerated = _write_study(tmp_path / "regenerated")
    first = regenerated / "datasets" / "random"
    shutil.rmtree(first)
    make_addition_datasets(2, 8, seed=2, families=["random"])["random"].save(first)
    with pytest.raises(SystemExit, match="'random' has fingerprint"):
        step3.main(["--results", str(regenerated)])

    unrecorded = _write_study(tmp_path / "unrecorded")
    metadata = json.loads((unrecorded / "metadata.json").read_text())
    del metadata["experiments"]
    (unrecorded / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(SystemExit, match="records no experiments"):
        step3.main(["--results", str(unrecorded)])


def test_step3_scores_whole_addends_for_multi_digit_tokens(tmp_path):
    step3 = _step3()
    assert step3.default_targets(2, ["addend_0", "op", "addend_1", "last"])[:3] == [
        ["digit_0_1", "digit_0_0"], ["digit_1_1", "digit_1_0"], ["carry_0"]]
    assert step3.default_targets(2, ["digit_0_1", "digit_0_0", "last"])[0] == ["digit_0_1"]
    study = _write_study(tmp_path / "study", positions=("addend_0", "last"))
    summary = (step3.main(["--results", str(study)]) / "summary.md").read_text()
    assert "| digit_0_1+digit_0_0 | `L-1@addend_0` |" in summary
    assert "| digit_0_0 |" not in summary and "| digit_0_1 |" not in summary
    assert "| digit_0_1+digit_0_0 | 1.000 |" in summary  # informative IIA at its own position (the embeddings)


def test_step3_refuses_a_target_the_main_hypothesis_lacks(tmp_path):
    """A typo in --target-vars is refused with one line (competitors lacking a variable are only skipped)."""
    study = _write_study(tmp_path / "study")
    with pytest.raises(ValueError, match=r"\['carry_9'\] are not variables of the main hypothesis"):
        _step3().main(["--results", str(study), "--target-vars", "carry_9"])
