"""Execute every tutorial notebook in demos/ top to bottom; any cell error fails the test.

Each notebook runs in a fresh kernel started with *this* interpreter (a throwaway kernelspec whose
argv is ``sys.executable``, so a ``python3`` kernelspec elsewhere on the machine cannot hijack the
run), with a temporary working directory: notebooks must not write into the repository.
Notebooks 02-04 need the trained organism checkpoint and are skipped when it is absent.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

from tasks.general_addition.organism import ORGANISM_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMOS = ROOT / "demos"
NOTEBOOKS = [
    "01_addition_causal_models.ipynb",
    "02_token_positions.ipynb",
    "03_counterfactuals_and_carries.ipynb",
    "04_localize_with_patching.ipynb",
    "07_continuous_thought.ipynb",  # uses the CT organism shipped in tasks/ct_positions/organism/
]
NEEDS_ORGANISM = set(NOTEBOOKS[1:4])
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory) -> KernelSpecManager:
    """A kernelspec named python3 that launches ipykernel with the interpreter running the tests."""
    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / "python3"
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernels)])


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    # the repo importable even without an editable install; nothing is ever downloaded
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    return env


def _error_report(nb) -> str:
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index}: {output['ename']}: {output['evalue']}"
    return "no error output recorded"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    nb = nbformat.read(DEMOS / name, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{name}: code cells {dirty} have outputs or execution counts; clear them before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name: str, kernel_spec_manager: KernelSpecManager, tmp_path: Path, record_property) -> None:
    if name in NEEDS_ORGANISM and not (ORGANISM_DIR / "config.json").exists():
        pytest.skip(f"organism checkpoint not found in {ORGANISM_DIR}; train it with "
                    f"python -m tasks.general_addition.organism.train_organism")
    nb = nbformat.read(DEMOS / name, as_version=4)
    demos_before = sorted(p.name for p in DEMOS.iterdir())
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernel_spec_manager)
    client = nbclient.NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env(), cleanup_kc=True)  # we made km, so ask nbclient to shut the kernel down
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name} failed: {_error_report(nb)}\n{exc}")
    seconds = time.perf_counter() - start
    record_property("seconds", round(seconds, 1))
    print(f"{name}: {seconds:.1f} s")
    assert sorted(p.name for p in DEMOS.iterdir()) == demos_before, f"{name} wrote files into {DEMOS}"
