"""The causal package must never import torch (nor transformers / pyvene), directly or indirectly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_causal_package_does_not_import_torch():
    code = (
        "import sys, causal, causal.causal_model, causal.counterfactual_dataset, causal.interchange_scores, "
        "causal.results, causal.results.reader, causal.results.writer, causal.results.legacy, "
        "causal.results.shards, causal.results.lock; assert 'torch' not in sys.modules; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'pyvene') if m in sys.modules); "
        "assert not heavy, heavy; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_causal_sources_name_no_torch_imports():
    for path in sorted((ROOT / "causal").rglob("*.py")):
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                module = stripped.split()[1].split(".")[0]
                where = f"{path.relative_to(ROOT)}:{line_no}"
                assert module not in {"torch", "transformers", "pyvene"}, f"{where}: {stripped}"
