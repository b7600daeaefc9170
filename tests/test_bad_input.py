"""Bad input is refused before any work, with a message naming the culprit.

Library side: token-position indexers, pipeline settings and prompts, datasets given to an
experiment (nothing may be written before the refusal), hub names without a network. Command
line: the step scripts print user errors as one line and answer ``--help`` without importing torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from causal.counterfactual_dataset import CounterfactualDataset
from experiments.engine.intervention_experiment import PatchResidualStream
from experiments.pipeline import LMPipeline, ModelLoadError, PromptError
from experiments.token_positions import TokenPosition, TokenPositionError, last_token_position

REPO = Path(__file__).resolve().parents[1]
STEPS = REPO / "tasks" / "general_addition"
MAX_POSITIONS = 64  # of every tiny model in conftest


def toy_dataset(bases: list[str], counterfactuals: list[list[str]], id: str = "toy") -> CounterfactualDataset:
    return CounterfactualDataset.from_dict(
        {"input": [{"raw_input": b} for b in bases],
         "counterfactual_inputs": [[{"raw_input": c} for c in cfs] for cfs in counterfactuals]},
        id=id,
    )


GOOD = toy_dataset(["12+34=", "5+6="], [["9+87="], ["3+3="]], id="good")


def refused_before_writing(experiment: PatchResidualStream, datasets, folder: Path, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        experiment.perform_interventions(datasets, results_dir=folder, verbose=False)
    assert not (folder / "manifest.json").exists() and not any(folder.glob("**/*.parquet"))


# ---------------------------------------------------------------------------------- token positions


@pytest.mark.parametrize("returned", [None, 1.0, [1, 2.0], [[1]], True, [True], "1", {1}])
def test_indexer_must_return_an_int_or_a_list_of_ints(pipelines, returned):
    position = TokenPosition(lambda setting: returned, pipelines["llama"], id="odd")
    with pytest.raises(TokenPositionError, match=r"indexer of token position 'odd' must return an int or a list of ints"):
        position.index({"raw_input": "12+34="})


def test_indexer_ints_are_accepted_in_any_integral_form(pipelines):
    import numpy as np

    pipeline = pipelines["llama"]
    setting = {"raw_input": "12+34="}  # "<s> 1 2 + 3 4 =": 7 tokens
    for returned, expected in ((2, [2]), ((1, -1), [1, 6]), ([np.int64(3)], [3]), (np.int32(-2), [5])):
        assert TokenPosition(lambda s, r=returned: r, pipeline, id="p").index(setting) == expected


def test_counterfactual_indexer_answer_is_checked_too(pipelines):
    position = TokenPosition(lambda s: [1], pipelines["llama"], id="two_sided", counterfactual_indexer=lambda s: None)
    assert position.index({"raw_input": "12+34="}) == [1]
    with pytest.raises(TokenPositionError, match="'two_sided'.*got NoneType None"):
        position.counterfactual_index({"raw_input": "12+34="})


def test_token_position_needs_a_callable_and_an_id(pipelines):
    with pytest.raises(TypeError, match="indexer of token position 'p' must be callable"):
        TokenPosition([1], pipelines["llama"], id="p")
    with pytest.raises(ValueError, match="non-empty string id"):
        TokenPosition(lambda s: [1], pipelines["llama"], id="")


def test_bad_indexer_is_refused_before_a_manifest_is_written(pipelines, tmp_path):
    pipeline = pipelines["gpt2"]
    forgetful = TokenPosition(lambda setting: None, pipeline, id="forgot_return")  # a missing `return`
    experiment = PatchResidualStream(pipeline, [0], [forgetful], config={"id": "bad_indexer"})
    refused_before_writing(experiment, GOOD, tmp_path / "out", TokenPositionError, "'forgot_return'.*NoneType")


# ---------------------------------------------------------------------------------- pipeline settings and prompts


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_new_tokens_below_one_is_refused_before_loading(tmp_path, value):
    # the folder does not even exist: the argument is checked first
    with pytest.raises(ValueError, match=rf"max_new_tokens must be an integer >= 1, got {value!r}"):
        LMPipeline(tmp_path / "never-read", max_new_tokens=value, device="cpu")


def test_top_k_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        LMPipeline(tmp_path / "never-read", top_k=0, device="cpu")


def test_max_new_tokens_override_below_one_is_refused(pipelines):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        pipelines["gpt2"].generate(["12+34="], max_new_tokens=0)


@pytest.mark.parametrize("prompt", ["", {"raw_input": ""}])
def test_empty_prompt_is_refused(pipelines, prompt):
    pipeline = pipelines["llama"]
    with pytest.raises(PromptError, match="empty prompt"):
        pipeline.generate(["12+34=", prompt])
    with pytest.raises(PromptError, match="empty prompt"):
        pipeline.tokenize_one(prompt)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # n_positions / max_position_embeddings
def test_prompt_longer_than_the_model_is_refused(pipelines, family):
    pipeline = pipelines[family]
    assert pipeline.max_positions == MAX_POSITIONS
    too_long = "1+" * 40 + "1="  # 82 characters + BOS, one token each
    with pytest.raises(PromptError, match=rf"prompt #1 '1\+1\+.*has 83 tokens but .* at most {MAX_POSITIONS}"):
        pipeline.load(["12+34=", too_long])


def test_prompt_must_leave_room_for_the_answer(pipelines):
    pipeline = pipelines["llama"]  # max_new_tokens=3: a prompt of n tokens needs n + 2 positions
    fits = "1" * (MAX_POSITIONS - 3)  # + BOS = 62 tokens -> 64 positions
    overflows = "1" * (MAX_POSITIONS - 2)  # 63 tokens -> 65 positions
    assert pipeline.generate([fits]).token_ids.shape == (1, 3)
    pipeline.check_prompts([fits])
    with pytest.raises(PromptError, match=f"63 tokens; with 3 generated tokens it needs 65 positions .* at most {MAX_POSITIONS}"):
        pipeline.generate([overflows])
    with pytest.raises(PromptError, match=f"prompt #1 '1111.*has 63 tokens; with 3 generated tokens it needs 65 positions .* at most {MAX_POSITIONS}"):
        pipeline.check_prompts([fits, overflows])
    assert pipeline.generate([overflows], max_new_tokens=1).token_ids.shape == (1, 1)


def test_chat_template_missing_is_refused(model_dirs):
    pipeline = LMPipeline(model_dirs["gpt2"], device="cpu", use_chat_template=True)
    with pytest.raises(PromptError, match="use_chat_template is set but the tokenizer of .* has no chat template"):
        pipeline.generate(["12+34="])


# ---------------------------------------------------------------------------------- datasets given to an experiment


def sweep(pipeline: LMPipeline, **config) -> PatchResidualStream:
    return PatchResidualStream(pipeline, [0], [last_token_position(pipeline)], config={"id": "sweep", **config})


def test_example_without_counterfactuals_is_refused_up_front(pipelines, tmp_path):
    # the culprit sits in the second dataset, in a later part: still refused before anything is written
    late = toy_dataset(["1+1=", "2+2=", "3+3="], [["4+4="], ["5+5="], []], id="late")
    refused_before_writing(sweep(pipelines["gpt2"], batch_size=1), [GOOD, late], tmp_path / "out", ValueError,
                           r"example 2 of dataset 'late' has no counterfactual input #0 \(it has 0")


def test_counterfactual_index_beyond_the_list_is_refused(pipelines, tmp_path):
    refused_before_writing(sweep(pipelines["gpt2"], counterfactual_index=1), GOOD, tmp_path / "out", ValueError,
                           r"example 0 of dataset 'good' has no counterfactual input #1 \(it has 1;")


def test_empty_prompt_in_a_dataset_is_refused_up_front(pipelines, tmp_path):
    holes = toy_dataset(["1+1=", "2+2="], [["4+4="], [""]], id="holes")
    refused_before_writing(sweep(pipelines["gpt2"]), [GOOD, holes], tmp_path / "out", PromptError,
                           "dataset 'holes' example 1 counterfactual input #0: empty prompt")


def test_too_long_prompt_in_a_dataset_is_refused_up_front(pipelines, tmp_path):
    long = toy_dataset(["1+1=", "2" * 70 + "="], [["4+4="], ["5+5="]], id="long")
    refused_before_writing(sweep(pipelines["llama"]), [GOOD, long], tmp_path / "out", PromptError,
                           f"dataset 'long' example 1 input '2222.*has 72 tokens; with 3 generated tokens it needs 74 positions .* at most {MAX_POSITIONS}")


def test_valid_datasets_still_run(pipelines, tmp_path):
    raw = sweep(pipelines["gpt2"]).perform_interventions(GOOD, results_dir=tmp_path / "out", verbose=False)
    assert raw.is_complete() and len(raw.intervened_outputs("good")) == len(GOOD)


# ---------------------------------------------------------------------------------- hub names without a network


@pytest.mark.parametrize("offline", [True, False])
def test_unknown_hub_name_fails_fast_in_one_line(monkeypatch, offline):
    """Offline mode, or no network (or, with one, a repository that does not exist): one line, in seconds."""
    import huggingface_hub.constants

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "no-such-org-7d1c/no-such-model"
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        LMPipeline(name, device="cpu")
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert "\n" not in message and repr(name) in message and "neither a local folder" in message
    assert ("HF_HUB_OFFLINE is set" in message) == offline
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_invalid_hub_name_is_refused(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelLoadError, match="neither a local folder nor a valid hub name"):
        LMPipeline("two words", device="cpu")


# ---------------------------------------------------------------------------------- step scripts


def run_script(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env=env or dict(os.environ), cwd=cwd)


def test_step_help_needs_no_torch_and_lists_only_its_own_options(tmp_path):
    code = (
        "import contextlib, io, json, runpy, sys\n"
        "helps = {}\n"
        "for step in ('01_generate_and_filter_dataset', '02_run_interventions', '03_compute_scores_and_visualize'):\n"
        "    sys.argv = [step, '--help']\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        f"        runpy.run_path({str(STEPS)!r} + '/' + step + '.py', run_name='__main__')\n"
        "    helps[step] = out.getvalue()\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'helps': helps}))\n"
    )
    proc = run_script("-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["torch"] is False, "--help imported torch"
    step1, step2, step3 = report["helps"].values()
    for text in (step1, step2, step3):
        assert "--debug" in text
    assert "--size" in step1 and "--families" in step1 and "--batch-size" not in step1 and "--layers" not in step1
    assert "--batch-size" in step2 and "--layers" in step2 and "--size" not in step2 and "--families" not in step2
    assert "--results" in step3 and "--model" not in step3


def test_step_accepts_the_other_steps_options_for_run_all():
    from tasks.general_addition.study import study_parser

    args = study_parser(None, step=2).parse_args(["--size", "16", "--families", "random", "--layers", "0"])
    assert (args.size, args.families, args.layers) == (16, ["random"], [0])


@pytest.mark.parametrize("argv", [
    ["--digits", "3"],
    ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--device", "cuda", "--dtype", "bfloat16", "--chat"],
    ["--test", "--size", "8", "--layers", "0", "1", "--no-heads", "--debug"],
])
def test_run_study_accepts_what_the_readme_shows(argv):
    from tasks.general_addition.study import study_dir, study_parser

    args = study_parser(None).parse_args(argv)
    assert study_dir(args).parts[:2] == ("results", "addition")


@pytest.mark.slow  # two subprocesses
def test_missing_study_files_are_one_line_errors(tmp_path):
    missing = tmp_path / "no-study"
    step3 = str(STEPS / "03_compute_scores_and_visualize.py")
    proc = run_script(step3, "--results", str(missing), cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "metadata.json not found" in lines[0] and "FileNotFoundError" in lines[0], proc.stderr
    debug = run_script(step3, "--results", str(missing), "--debug", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


@pytest.mark.slow  # a subprocess that imports torch
def test_unknown_model_is_a_one_line_error_from_step_1(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    start = time.perf_counter()
    proc = run_script(str(STEPS / "01_generate_and_filter_dataset.py"), "--model", "no-such-org-7d1c/no-such-model",
                      "--out", str(tmp_path / "study"), "--device", "cpu", env=env, cwd=tmp_path)
    assert time.perf_counter() - start < 120  # mostly importing torch on a busy machine; no retries
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "ModelLoadError" in lines[0], proc.stderr
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_an_unknown_device_is_refused_by_the_parser(device, capsys):
    from tasks.general_addition.study import study_parser

    with pytest.raises(SystemExit):
        study_parser(None).parse_args(["--device", device])
    assert f"unknown device {device!r}" in capsys.readouterr().err


def test_a_crash_inside_a_step_is_one_line(capsys):
    from experiments.steps.common import run_step

    def crashing(argv):
        raise KeyError("an internal surprise")

    assert run_step(crashing, []) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KeyError" in err[0] and "--debug" in err[0]
    with pytest.raises(KeyError):
        run_step(crashing, ["--debug"])
