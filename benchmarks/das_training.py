"""DAS training on the addition organism: pyvene's own DAS loop against ours (training through the suffix), in one
process, same unit, model, data, batches, loss, optimiser and initial subspace.

- pyvene: an ``IntervenableModel`` with ``LowRankRotatedSpaceIntervention`` (or, with ``--rotation``,
  ``RotatedSpaceIntervention`` with ``set_interchange_dim(k)``) at the cell's residual stream (``block_output``
  of the layer; ``block_input`` of layer 0 for the embeddings), called per step on the base batch and its source
  batch (the way pyvene's DAS tutorials train: the source forward runs every step), Adam on the intervention.
- ours: `ResidualDAS.optimise` on the same cell (sources and the base below the cell computed once; every step
  runs the layers above the cell on the columns from the intervened one, head on the answer columns only) with
  the same parametrisation: `LowRankSubspace` holds a (d, k) weight under torch's orthogonal parametrisation, as
  pyvene's ``LowRankRotateLayer`` does, and pyvene's initial state (its weight and the parametrisation's base) is
  loaded into it; with ``--rotation``, `OrthogonalSubspace` (a (d, d) ``matrix_exp`` rotation, the default of
  `ResidualDAS.fit`) and its initial state loaded into pyvene's ``RotateLayer``.
- the plain full forward with a hook patch at the cell (`ResidualDAS(force_full_forward=True)`), for reference.

Loss: minus the mean over the batch of the summed log-probability of every answer token, teacher-forced;
Adam, lr 1e-2, batch 32, batches drawn as `ResidualDAS` draws them. Reported per cell: steps per second (best of
``--repeats`` timed runs of ``--steps`` steps, each from the same initial state), max |loss difference| over the
first ``--check-steps`` steps (float32), and, for a few cells, CPU tensor memory in MiB (torch profiler memory
timeline: tensors created minus destroyed; the model weights and anything made before a measured call are not
counted): the peak during setup, what setup leaves held, and the peak during 5 training steps. Setup: pyvene's
wrapper and its input batches; ours: the source residuals, the teacher-forced base pass (every layer's residual
and keys/values, kept for every cell of the dataset) and the cell's suffix cache; hooked: the residuals only.

Loss agreement and k: Adam divides each coordinate's step by the root of its squared-gradient average, so its
first steps are about lr·sign(g) per coordinate, whatever |g|: a coordinate whose gradient is at rounding level
moves by up to lr, in a direction set by the rounding. With k >= 2 every orthogonal parametrisation has such
directions (turning the basis inside its own span leaves the loss unchanged), so two implementations whose
float32 roundings differ anywhere (pyvene against ours, or our hooked full forward against our suffix) drift
apart after a few steps (~1e-3 to 1e-1 over 20 steps). The float32 agreement check therefore runs at k = 1 (no
such direction: agreement ~1e-5); ``--float64-check`` repeats k = 2 (low rank and full rotation) with the model
and the bases in float64, where the same comparison agrees to ~1e-6.

    .venv/bin/python benchmarks/das_training.py [--k 1] [--steps 40] [--check-steps 20] [--repeats 2]
        [--threads 2] [--cells L-1@digit_0_1 L1@digit_1_0 ...] [--rotation] [--float64-check] [--scan]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    import pyvene

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.attribution import ResidualAttribution, ResidualCell  # noqa: E402
from experiments.featurizers.training import LabelledPairs  # noqa: E402
from experiments.featurizers.learned import LowRankSubspace, OrthogonalSubspace  # noqa: E402
from experiments.pipeline import LMPipeline  # noqa: E402
from experiments.backends.pyvene_backend import pyvene_config_fixes, register_model_class  # noqa: E402
from experiments.featurizers.das import ResidualDAS  # noqa: E402
from tasks.general_addition.task import TASK, AdditionSettings  # noqa: E402


# ---------------------------------------------------------------------------------------------- data
def organism_das(pipeline: LMPipeline, pairs: int, seed: int, **kwargs: Any) -> tuple[ResidualDAS, dict[str, Any]]:
    """The das_scan data: carry_0 labels of the random and flip_carry_0 families, ``pairs`` each."""
    settings = AdditionSettings()
    datasets = TASK.make_datasets(settings, ["random", "flip_carry_0"], pairs, seed)
    data = LabelledPairs.from_datasets(datasets, TASK.main_model(settings), "carry_0")
    das = ResidualDAS(pipeline, data.bases, data.sources, data.labels, seed=seed, **kwargs)
    positions = {p.id: p for p in TASK.token_positions(pipeline, settings)}
    return das, positions


def batches(das: ResidualDAS, steps: int, batch_size: int = 32) -> list[np.ndarray]:
    """The rows of each step, drawn exactly as `ResidualDAS.optimise` draws them."""
    generator = torch.Generator().manual_seed(das.seed)
    return [das.train[torch.randint(len(das.train), (min(batch_size, len(das.train)),), generator=generator).numpy()]
            for _ in range(steps)]


# ---------------------------------------------------------------------------------------------- pyvene
def answer_logprob(logits: torch.Tensor, inputs: dict[str, torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """`ResidualAttribution.answer_logprob` (summed log-probabilities of each row's last ``lengths[b]`` tokens),
    in at least float32 as `SuffixForward` computes it (float64 logits stay float64 for the float64 check)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    width = logits.shape[1]
    out = []
    for b, n in enumerate(lengths):
        cols = torch.arange(width - n, width, device=logits.device)
        out.append(logp[b, cols - 1, inputs["input_ids"][b, cols]].sum())
    return torch.stack(out)


class PyveneDAS:
    """pyvene's DAS training loop at one residual cell."""

    def __init__(self, das: ResidualDAS, cell: ResidualCell, k: int, rotation: bool):
        pipeline = das.pipeline
        model = pipeline.model
        layer, component = (0, "block_input") if cell.layer == -1 else (cell.layer, "block_output")
        register_model_class(model)
        kind = pyvene.RotatedSpaceIntervention if rotation else pyvene.LowRankRotatedSpaceIntervention
        representation = pyvene.RepresentationConfig(layer, component, "pos", 1,
                                                     low_rank_dimension=None if rotation else k)
        config = pyvene.IntervenableConfig(model_type=type(model), representations=[representation],
                                           intervention_types=kind)
        with pyvene_config_fixes(model), contextlib.redirect_stdout(io.StringIO()):
            self.intervenable = pyvene.IntervenableModel(config, model=model, use_fast=False)
        self.intervenable.disable_model_gradients()
        self.intervention = next(iter(self.intervenable.interventions.values()))
        if rotation:
            self.intervention.set_interchange_dim(k)
        self.intervention.to(model.dtype)
        self.pipeline = pipeline
        # inputs made here, independently of ResidualDAS's machinery: teacher-forced bases, source prompts
        self.access = ResidualAttribution(pipeline, [])
        answers = [self.access.answer_ids(label) for label in das.labels]
        self.inputs, starts, self.lengths = self.access.teacher_forced_inputs(das.bases, answers)
        self.sources = pipeline.load(das.sources)
        self.base_cols = [starts[i] + cell.position.index(b)[0] for i, b in enumerate(das.bases)]
        self.src_cols = [self.sources.pad_offsets[i] + cell.position.counterfactual_index(s)[0]
                         for i, s in enumerate(das.sources)]

    def rotate_layer(self) -> torch.nn.Module:
        return self.intervention.rotate_layer

    def train(self, rows_per_step: list[np.ndarray], lr: float = 1e-2) -> list[float]:
        optimiser = torch.optim.Adam(self.intervention.parameters(), lr=lr)
        losses = []
        self.intervention.train()
        for rows in rows_per_step:
            index = torch.as_tensor(rows)
            base = {k: v[index] for k, v in self.inputs.items()}
            source = self.sources.select(rows).model_inputs()
            locations = {"sources->base": ([[[self.src_cols[i]] for i in rows]], [[[self.base_cols[i]] for i in rows]])}
            _, out = self.intervenable(base, [source], unit_locations=locations)
            loss = -answer_logprob(out.logits, base, [self.lengths[i] for i in rows]).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        return losses


# ---------------------------------------------------------------------------------------------- ours
def ours_module(pv: PyveneDAS, k: int, rotation: bool, seed: int) -> torch.nn.Module:
    """Our trainable interchange in the same parametrisation and initial state as ``pv``'s (rotation: ours is
    the reference and is copied into pyvene; low rank: pyvene's initial state is copied into ours)."""
    d = pv.pipeline.hidden_size
    if rotation:
        module = OrthogonalSubspace(d, k, "matrix_exp", seed).to(pv.pipeline.model.dtype)
        pv.rotate_layer().load_state_dict(module.rotation.state_dict())
        return module
    module = LowRankSubspace(d, k, seed).to(pv.pipeline.model.dtype)
    module.rotate_layer.load_state_dict(pv.rotate_layer().state_dict())
    return module


def timed(fn: Callable[[], list[float]]) -> tuple[list[float], float]:
    start = time.perf_counter()
    losses = fn()
    return losses, time.perf_counter() - start


def memory_timeline(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``'s result, the peak MiB of CPU tensors it had alive at once and the MiB still alive after it,
    counted from the tensors it creates (torch profiler memory timeline: CREATE adds, DESTROY subtracts;
    tensors made before the call, the model weights among them, are not counted)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        result = fn()
    current = peak = 0
    for _, action, (key, _), size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return result, peak / 2**20, current / 2**20


# ---------------------------------------------------------------------------------------------- runs
def compare_cell(pipeline: LMPipeline, das: ResidualDAS, full: ResidualDAS, cell: ResidualCell, k: int,
                 rotation: bool, steps: int, check: int, repeats: int) -> dict[str, Any]:
    prep, prep_full = das.prepare(cell), full.prepare(cell)
    pv = PyveneDAS(das, cell, k, rotation)
    initial_pv = {n: t.clone() for n, t in pv.rotate_layer().state_dict().items()}
    rows = batches(das, max(steps, check))
    best = {"pyvene": np.inf, "ours": np.inf, "hooks": np.inf}
    losses: dict[str, list[float]] = {}
    for repeat in range(repeats):
        pv.rotate_layer().load_state_dict(initial_pv)
        module = ours_module(pv, k, rotation, das.seed)
        if rotation:  # pyvene's state now follows ours
            initial_pv = {n: t.clone() for n, t in pv.rotate_layer().state_dict().items()}
        state = {n: t.clone() for n, t in module.state_dict().items()}
        runs = {
            "pyvene": lambda: pv.train(rows[:steps]),
            "ours": lambda: das.optimise(prep, module, steps=steps),
            "hooks": lambda: full.optimise(prep_full, reference, steps=steps),
        }
        reference = ours_module(pv, k, rotation, das.seed)
        reference.load_state_dict(state)
        for name, run in runs.items():
            got, seconds = timed(run)
            best[name] = min(best[name], seconds)
            if repeat == 0:
                losses[name] = got
        pv.rotate_layer().load_state_dict(initial_pv)
    diff = max(abs(a - b) for a, b in zip(losses["pyvene"][:check], losses["ours"][:check]))
    diff_hooks = max(abs(a - b) for a, b in zip(losses["hooks"][:check], losses["ours"][:check]))
    return {"cell": cell.cell_id, "r": cell.layer + 1, **{f"{n}_sps": steps / best[n] for n in best},
            "diff": diff, "diff_hooks": diff_hooks}


def memory_of(pipeline: LMPipeline, cell_id: str, k: int, pairs: int, seed: int,
              rotation: bool) -> dict[str, tuple[float, float, float]]:
    """Per side: (setup peak, held after setup, peak of 5 training steps) in MiB of tensors. Setup: pyvene's
    wrapper and inputs; ours: the source residuals, the teacher-forced base pass and the cell's cache; hooked:
    the same with the residuals only."""
    out = {}
    for name in ("pyvene", "hooks", "ours"):
        das, positions = organism_das(pipeline, pairs, seed, force_full_forward=(name == "hooks"))
        cell = parse_cell(cell_id, positions)
        rows = batches(das, 5)
        d = pipeline.hidden_size
        module = OrthogonalSubspace(d, k, "matrix_exp", seed) if rotation else LowRankSubspace(d, k, seed)
        if name == "pyvene":
            setup, setup_peak, held = memory_timeline(lambda: PyveneDAS(das, cell, k, rotation))
            _, steps_peak, _ = memory_timeline(lambda: setup.train(rows))
        else:
            setup, setup_peak, held = memory_timeline(lambda: das.prepare(cell))
            _, steps_peak, _ = memory_timeline(lambda: das.optimise(setup, module, steps=5))
        out[name] = (setup_peak, held, steps_peak)
    return out


def float64_check(k: int, check: int, pairs: int, seed: int, cells: list[str]) -> list[dict[str, Any]]:
    """k >= 2 in float64: pyvene and ours agree once rounding noise is far below Adam's eps."""
    from tasks.general_addition.organism import ORGANISM_DIR

    pipeline = LMPipeline(str(ORGANISM_DIR), device="cpu", dtype=torch.float64)
    das, positions = organism_das(pipeline, pairs, seed)
    out = []
    for rotation in (False, True):
        for cell_id in cells:
            cell = parse_cell(cell_id, positions)
            prep = das.prepare(cell)
            torch.set_default_dtype(torch.float64)  # initial bases orthonormal to float64 precision on both sides
            try:
                pv = PyveneDAS(das, cell, k, rotation)
                module = ours_module(pv, k, rotation, das.seed)
            finally:
                torch.set_default_dtype(torch.float32)
            theirs = pv.train(batches(das, check))
            ours = das.optimise(prep, module, steps=check)
            out.append({"cell": cell_id, "param": "rotation (matrix_exp)" if rotation else "low rank (Householder)",
                        "diff": max(abs(a - b) for a, b in zip(theirs, ours))})
    return out


def parse_cell(cell_id: str, positions: dict[str, Any]) -> ResidualCell:
    layer, position = cell_id[1:].split("@")
    return ResidualCell(int(layer), positions[position])


def run_scan(threads: int, steps: int) -> tuple[float, str]:
    """Wall time of scripts/das_scan.py (all cells of the 2-digit study plus its default joint units)."""
    command = [sys.executable, str(ROOT / "scripts" / "das_scan.py"), "--steps", str(steps), "--threads", str(threads)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"das_scan failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--check-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=256, help="pairs per family (das_scan's default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", nargs="*", default=None, help="cell ids (default: every layer × position)")
    parser.add_argument("--rotation", action="store_true", help="full (d, d) matrix_exp rotation on both sides")
    parser.add_argument("--memory-cells", nargs="*", default=["L-1@digit_0_1", "L1@digit_1_0"])
    parser.add_argument("--float64-check", action="store_true")
    parser.add_argument("--scan", action="store_true", help="also time scripts/das_scan.py (300 steps per cell)")
    parser.add_argument("--scan-steps", type=int, default=300)
    args = parser.parse_args()
    if args.steps < args.check_steps:
        parser.error("--steps must be at least --check-steps (the compared losses are those of the first timed run)")
    torch.set_num_threads(args.threads)
    from tasks.general_addition.organism import ORGANISM_DIR

    pipeline = LMPipeline(str(ORGANISM_DIR), device="cpu")
    das, positions = organism_das(pipeline, args.pairs, args.seed)
    full, _ = organism_das(pipeline, args.pairs, args.seed, force_full_forward=True)
    cell_ids = args.cells or [f"L{layer}@{p}" for layer in range(-1, pipeline.num_layers) for p in positions]
    param = "full rotation (d×d, matrix_exp)" if args.rotation else "low rank (d×k, Householder)"
    print(f"organism, {len(das.train)} train pairs, batch 32, k={args.k}, {param}, {args.threads} threads, "
          f"{args.steps} timed steps × best of {args.repeats}, losses compared over {args.check_steps} steps (float32)\n")
    rows = []
    for cell_id in tqdm(cell_ids, desc="cells", leave=False):
        rows.append(compare_cell(pipeline, das, full, parse_cell(cell_id, positions), args.k, args.rotation,
                                 args.steps, args.check_steps, args.repeats))
    print("| cell | pyvene steps/s | hooked full forward steps/s | ours (suffix) steps/s | ours ÷ pyvene | "
          "max abs Δloss vs pyvene | vs hooked |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| `{row['cell']}` | {row['pyvene_sps']:.1f} | {row['hooks_sps']:.1f} | {row['ours_sps']:.1f} | "
              f"{row['ours_sps'] / row['pyvene_sps']:.1f}× | {row['diff']:.1e} | {row['diff_hooks']:.1e} |")
    total = {n: sum(1 / r[f"{n}_sps"] for r in rows) for n in ("pyvene", "hooks", "ours")}
    ratios = [r["ours_sps"] / r["pyvene_sps"] for r in rows]
    print(f"\nall {len(rows)} cells, the same steps each (a scan's mix): pyvene {len(rows) / total['pyvene']:.1f} "
          f"steps/s, hooked full forward {len(rows) / total['hooks']:.1f}, ours {len(rows) / total['ours']:.1f} "
          f"→ {total['pyvene'] / total['ours']:.1f}× pyvene (per cell {min(ratios):.1f}× – {max(ratios):.1f}×); "
          f"max |Δloss| over {args.check_steps} steps: {max(r['diff'] for r in rows):.1e} vs pyvene, "
          f"{max(r['diff_hooks'] for r in rows):.1e} vs the hooked full forward")

    if args.memory_cells:
        print("\npeak CPU tensor memory, MiB (torch profiler memory timeline): setup peak / held after setup / "
              "peak over 5 training steps\n\n| cell | pyvene | hooked full forward | ours (suffix) |\n|---|---|---|---|")
        for cell_id in args.memory_cells:
            mem = memory_of(pipeline, cell_id, args.k, args.pairs, args.seed, args.rotation)
            print(f"| `{cell_id}` | " + " | ".join("{:.1f} / {:.1f} / {:.1f}".format(*mem[n])
                                                  for n in ("pyvene", "hooks", "ours")) + " |")

    if args.float64_check:
        print("\n| cell (k=2, float64) | parametrisation | max abs Δloss vs pyvene |\n|---|---|---|")
        for row in float64_check(2, args.check_steps, args.pairs, args.seed, ["L-1@digit_0_1", "L1@digit_1_0"]):
            print(f"| `{row['cell']}` | {row['param']} | {row['diff']:.1e} |")

    if args.scan:
        seconds, out = run_scan(args.threads, args.scan_steps)
        print(f"\nscripts/das_scan.py --steps {args.scan_steps} --threads {args.threads}: {seconds:.0f} s wall "
              f"(process start, data and every cell)\n")
        print(out)


if __name__ == "__main__":
    main()
