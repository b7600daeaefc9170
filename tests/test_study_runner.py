"""The study runner (``python -m experiments.study``): one runner, the same steps and the same folder layout for
every task; extra steps and report sections declared by the task; resuming; the three studies end to end."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments import study
from experiments.task import ExtraStep, StudyContext, get_task, register_task

OWN_TASK = Path(__file__).resolve().parents[1] / "demos" / "own_task" / "ones_and_tens"
LAYOUT = ("metadata.json", "datasets", "raw", "scores/summary.md", "report.md")


# ---------------------------------------------------------------------------------------- runner mechanics (no model)
@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    """The example task with no network work: every pair kept, no sweeps, one extra step and one report section."""
    saved = list(sys.path)
    own = get_task(str(OWN_TASK))
    sys.path[:] = saved
    runs = tmp_path_factory.mktemp("runs") / "count.txt"

    def count_pairs(context: StudyContext) -> None:
        runs.write_text(str(int(runs.read_text()) + 1) if runs.exists() else "1")
        pairs = sum(len(d) for d in context.datasets().values())
        (context.analysis_dir("count_pairs") / "pairs.json").write_text(json.dumps({"pairs": pairs,
                                                                                     "label": context.options.label}))

    def pairs_section(context: StudyContext) -> list[str]:
        data = json.loads((context.folder / "analyses" / "count_pairs" / "pairs.json").read_text())
        return ["## Pairs counted", "", f"{data['pairs']} pairs ({data['label']})"]

    def missing_section(context: StudyContext) -> list[str]:
        raise FileNotFoundError("nothing here: run the absent step")

    def options(group) -> None:
        group.add_argument("--label", default="plain")

    task = dataclasses.replace(
        own, name="runner_toy", sweeps=None, filter_pairs=False,
        extra_steps=(ExtraStep("count_pairs", count_pairs, after="filter", options=options),),
        report_sections=(pairs_section, missing_section))
    register_task(task)
    return task, runs


def test_step_order_and_extra_step_declarations(toy_task):
    task, _ = toy_task
    assert study.step_order(task) == ["filter", "count_pairs", "intervene", "score", "report"]
    assert study.step_order(get_task("decimal_comparison")) == [
        "filter", "bug_rate", "intervene", "patching", "generalisation", "attention", "transplant", "ablation",
        "score", "report"]
    assert study.step_order(get_task("ct_positions")) == [
        "filter", "intervene", "ct_patching", "blocking", "score", "report"]
    with pytest.raises(ValueError, match="after must be one of"):
        ExtraStep("x", lambda c: None, after="later")
    with pytest.raises(ValueError, match="name of a standard step"):
        ExtraStep("score", lambda c: None)
    with pytest.raises(ValueError, match="share a name"):
        dataclasses.replace(task, extra_steps=task.extra_steps * 2)


def test_runner_runs_resumes_and_reports(toy_task, tmp_path, capsys):
    task, runs = toy_task
    out = tmp_path / "study"
    folder = study.main(["--test", "--size", "6", "--out", str(out), "--label", "first"], task="runner_toy")
    assert folder == out and runs.read_text() == "1"
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["datasets"] == ["random", "carry_differs"]
    assert [r["input_accuracy"] for r in metadata["filter"]] == [None, None]  # every pair kept, no model run
    report = (out / "report.md").read_text()
    assert report.startswith("# runner_toy study: organism")
    assert "## Pairs counted\n\n12 pairs (first)" in report
    assert "## Missing: not available\n\nnothing here: run the absent step" in report
    assert "No `scores/summary.md`" in report  # nothing to score: the task has no sweeps

    capsys.readouterr()
    study.main(["--test", "--size", "6", "--out", str(out), "--label", "first"], task="runner_toy")
    said = capsys.readouterr().out
    assert "(same options); skipped" in said and "count_pairs: done with the same options" in said
    assert runs.read_text() == "1"  # resumed: nothing recomputed
    study.main(["--test", "--size", "6", "--out", str(out), "--label", "second", "--steps", "count_pairs",
                "report"], task="runner_toy")
    assert runs.read_text() == "2" and "12 pairs (second)" in (out / "report.md").read_text()  # other options: rerun
    study.main(["--test", "--size", "6", "--out", str(out), "--label", "second", "--redo", "count_pairs",
                "--steps", "count_pairs"], task="runner_toy")
    assert runs.read_text() == "3"
    with pytest.raises(SystemExit):
        study.main(["--out", str(out), "--steps", "nowhere"], task="runner_toy")


def test_report_step_alone_reads_the_study_folder(toy_task, tmp_path):
    from experiments.steps import report

    out = tmp_path / "study"
    study.main(["--test", "--size", "4", "--out", str(out), "--steps", "filter", "count_pairs"], task="runner_toy")
    assert not (out / "report.md").exists()
    assert report.main(["--results", str(out)], task="runner_toy") == out / "report.md"
    assert "8 pairs (plain)" in (out / "report.md").read_text()


def test_help_needs_no_torch_and_lists_every_steps_options(tmp_path):
    import subprocess

    code = ("import contextlib, io, json, sys\n"
            "from experiments import study\n"
            "helps = {}\n"
            "for task in ('general_addition', 'decimal_comparison', 'ct_positions'):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "        study.main(['--help'], task=task)\n"
            "    helps[task] = out.getvalue()\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'helps': helps}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["torch"] is False, "--help imported torch"
    helps = report["helps"]
    for text in helps.values():
        assert "--steps" in text and "--size" in text and "--layers" in text and "--target-vars" in text
    assert "--digits" in helps["general_addition"]
    assert "extra step bug_rate" in helps["decimal_comparison"] and "--n-bug" in helps["decimal_comparison"]
    assert "extra step blocking" in helps["ct_positions"] and "--codi-base" in helps["ct_positions"]


@pytest.mark.parametrize("argv", [
    ["--digits", "3"],
    ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--device", "cuda", "--dtype", "bfloat16", "--chat"],
    ["--test", "--size", "8", "--layers", "0", "1", "--no-heads", "--debug"],
    ["--steps", "score", "report", "--target-vars", "carry_0"],
])
def test_run_study_accepts_what_the_readme_shows(argv):
    """./run_study.sh is the runner on the addition task: the README's command lines parse, into results/addition."""
    from experiments.steps.common import study_dir

    task = get_task("general_addition")
    args = study.runner_parser(task).parse_args(argv)
    assert study_dir(task, args).parts[:2] == ("results", "addition")
    assert "experiments.study --task general_addition" in (Path(study.__file__).parents[1] / "run_study.sh").read_text()


# ---------------------------------------------------------------------------------------- a small real study (fast)
def test_ct_study_through_the_runner_small(tmp_path):
    """Datasets (step 1), patching each thought (an extra step that records engine-format raw results), step 3
    scoring them against both CT graphs, the report with the task's sections."""
    from tasks.ct_positions.organism import ORGANISM_DIR

    if not (ORGANISM_DIR / "latent_config.json").exists():
        pytest.skip("organism not trained")
    out = study.main(["--test", "--size", "6", "--families", "random", "change_step_1", "--out", str(tmp_path / "ct"),
                      "--steps", "filter", "intervene", "ct_patching", "score", "report"], task="ct_positions")
    assert all((out / name).exists() for name in LAYOUT)
    metadata = json.loads((out / "metadata.json").read_text())
    assert [e["id"] for e in metadata["experiments"]] == ["ct_patching"]
    assert sorted(p.name for p in (out / "scores").glob("*__verdicts.json")) == [
        "ct_patching__controls__verdicts.json", "ct_patching__default__verdicts.json", "ct_patching__late__verdicts.json"]
    report = (out / "report.md").read_text()
    assert "## CT graphs on whole-position patches" in report and "3 ops, default" in report
    assert "## Blocking: not available" in report  # that step was not run
    assert "### ct_patching: hypothesis `ct_3ops_112233`" in report  # the scores summary, under the sections


# ---------------------------------------------------------------------------------------- the three studies (slow)
@pytest.fixture(scope="module")
def three_studies(tmp_path_factory):
    """The addition, decimal and CT studies at --test sizes (reduced sweeps), each in its default study folder."""
    import os

    from tasks.ct_positions.organism import ORGANISM_DIR as CT_ORGANISM

    root = tmp_path_factory.mktemp("studies")
    here = Path.cwd()
    os.chdir(root)
    try:
        folders = {
            "addition": study.main(["--test", "--layers", "-1", "0", "--families", "random", "flip_carry_0",
                                    "--device", "cpu"], task="general_addition"),
            "decimal": study.main(["--test", "--size", "8", "--layers", "1", "2", "--roles", "matched last",
                                   "--transplant-layers", "1", "--n-bug", "16", "--device", "cpu"],
                                  task="decimal_comparison"),
        }
        if (CT_ORGANISM / "latent_config.json").exists():
            folders["ct"] = study.main(["--test", "--size", "8"], task="ct_positions")
    finally:
        os.chdir(here)
    return {name: root / folder for name, folder in folders.items()}


@pytest.mark.slow
def test_every_study_has_the_same_folder_layout(three_studies):
    assert {name: folder.relative_to(folder.parents[3]).as_posix() for name, folder in three_studies.items()} == {
        "addition": "results/addition/organism/2d_test",
        "decimal": "results/decimal/organism/qa_from_simple_roles-matched-last_test",
        **({"ct": "results/ct_positions/organism/3ops_test"} if "ct" in three_studies else {})}
    for name, folder in three_studies.items():
        for entry in LAYOUT:
            assert (folder / entry).exists(), (name, entry)
        metadata = json.loads((folder / "metadata.json").read_text())
        for experiment in metadata["experiments"]:  # every scored experiment: raw results in the results format
            assert (folder / experiment["folder"] / "manifest.json").exists(), (name, experiment)
            assert list((folder / "scores").glob(f"{experiment['id']}__*__verdicts.json")), (name, experiment)
        report = (folder / "report.md").read_text()
        assert report.startswith(f"# {metadata['task']} study: organism") and "## Scores (step 3)" in report


@pytest.mark.slow
def test_addition_study_through_the_runner(three_studies):
    folder = three_studies["addition"]
    metadata = json.loads((folder / "metadata.json").read_text())
    assert [e["id"] for e in metadata["experiments"]] == ["residual_stream", "attention_heads"]
    scores = json.loads((folder / "scores" / "residual_stream__carry.json").read_text())
    row = next(r for r in scores["pooled"] if r["target_variables"] == "digit_0_0" and r["cell_id"] == "L-1@digit_0_0")
    assert row["accuracy"] >= 0.9 and row["informative_accuracy"] >= 0.9  # the embedding patch moves the digit
    assert not (folder / "analyses").exists()  # addition declares no extra steps


@pytest.mark.slow
def test_decimal_study_through_the_runner(three_studies):
    """The numbers the old one-command decimal study checked, in the runner's layout."""
    folder = three_studies["decimal"]
    analyses = folder / "analyses"
    bug = json.loads((analyses / "bug_rate" / "bug_rate.json").read_text())
    assert bug["formats"]["qa"]["buggy"]["rate"] >= 0.7 and bug["formats"]["simple"]["buggy"]["rate"] <= 0.2
    patch = json.loads((analyses / "patching" / "patching.json").read_text())
    assert patch["components"] == ["attention_output", "mlp_output", "block_output"] and patch["layers"] == [1, 2]
    rows = {(r["cell_id"], r["dataset_id"]): r for r in patch["rows"]}
    attn = rows[("attention_output.L1@last", "fix")]
    assert attn["floor"]["rate"] <= 0.1 and attn["success"]["rate"] >= 0.8  # the organism decides at the last position
    assert rows[("mlp_output.L1@last", "fix")]["success"]["rate"] <= 0.2
    assert all(r["verdict"]["grade"] in ("full", "partial", "none") for r in patch["rows"])
    for name in ("generalisation", "attention", "transplant", "ablation"):
        assert (analyses / name / f"{name}.json").exists(), name
    for name in ("bug_rate_by_format", "fix_rate_layer_component", "transplant_bidirectional", "head_subsets",
                 "surgical_precision", "token_attention_two_formats"):
        assert (analyses / "figures" / f"{name}.png").exists() and (analyses / "figures" / f"{name}.pdf").exists()
    report = (folder / "report.md").read_text()
    for heading in ("## Bug rate per format", "## Layer × component patching", "## Generalisation",
                    "## Attention (answer position)", "## Attention transplantation", "## Head subsets",
                    "## Head ablation", "## MLP neuron ablation", "## Figures", "## Scores (step 3)"):
        assert heading in report, heading
    assert report.index("## Bug rate per format") < report.index("## Scores (step 3)")  # sections first
    assert "not available" not in report
    assert sorted(p.name for p in (folder / "scores").glob("attention_output__*.json")) == [
        "attention_output__controls__verdicts.json", "attention_output__numeric.json",
        "attention_output__numeric__verdicts.json", "attention_output__whole_number_fraction.json",
        "attention_output__whole_number_fraction__verdicts.json"]


@pytest.mark.slow
def test_ct_study_through_the_runner(three_studies):
    """The numbers the old one-command CT study checked, in the runner's layout."""
    if "ct" not in three_studies:
        pytest.skip("organism not trained")
    folder = three_studies["ct"]
    blocking = folder / "analyses" / "blocking"
    frame = pd.read_parquet(blocking / "predictions.parquet")
    assert len(frame) == 60 * 7 and set(frame["condition"]) == {"baseline", *[f"block_ct{j}" for j in range(6)]}
    assert {"problem_id", "question", "gold", "generated_text", "parsed_answer", "correct", "category"} <= set(frame)
    for name in ("taxonomy.json", "taxonomy_summary.json", "sensitivity.json", "taxonomy.png", "sensitivity_scatter.png"):
        assert (blocking / name).exists(), name
    scores = json.loads((folder / "analyses" / "ct_patching" / "ct_scores.json").read_text())
    assert set(scores["n_ops"]) == {"3"} and set(scores["n_ops"]["3"]) == {"default", "late", "base_accuracy"}
    report = (folder / "report.md").read_text()
    assert "## Blocking each continuous thought" in report and "| block_ct5 |" in report
    assert "## CT graphs on whole-position patches" in report and "not available" not in report
