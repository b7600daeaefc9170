"""Planted addition organisms: the shipped ``addition-llama`` fine-tuned so that ``carry_0`` provably lives in a
chosen 2-d subspace of the residual stream after decoder layer 0 at the ``digit_1_0`` token.

Produces ``planted-aligned/`` (subspace spanned by residual dimensions 0 and 1) or ``planted-rotated/`` (a random
2-d subspace: the first 2 columns of the Q factor of a seeded 128 x 128 Gaussian matrix), each with the weights
and tokenizer (``save_pretrained``, fp32 safetensors), ``planted.json`` (the spec read by
``tasks.general_addition.organism.load_planted_spec``) and ``training_report.json``.

Usage: ``python -m tasks.general_addition.organism.train_planted --basis aligned|rotated [--seed 0] [--steps N]
[--threads 1] [--out DIR]``. The seed fixes the training batches and the rotated basis; the same seed (and thread
count) gives the same losses. One torch thread by default: on a shared 2-core machine two threads ran several times
slower than one.

Recipe (interchange intervention training, IIT), from the shipped organism's weights. Each step:

1. task loss: ``batch_size`` (128) fresh training problems, drawn and encoded by ``train_organism.py``'s helpers
   (mixed widths, here half of them 2-digit; left padded, position ids from the attention mask), loss on the answer
   tokens and ``</s>``;
2. IIT loss: those problems are the sources. Each gets a fresh base of the same width, drawn so that a
   ``frac_differ`` share of the pairs have a different ``carry_0``. The base runs with its layer-0 output at its
   ``digit_1_0`` token replaced by ``x_b + (x_s - x_b) B Bᵀ`` (``x_s``: the source's, B: the planted (d, 2)
   basis) and is trained on the causal model's counterfactual answer (``build_addition_model(D)``, base run with
   ``carry_0`` set to the source's value), answer tokens and ``</s>``, teacher forced.

Loss = task + ``iit_weight`` (1) * IIT; gradients reach both runs. AdamW as ``train_organism.py`` (peak lr 1e-3,
50 warmup steps, cosine to 2%), 400 steps. Held-out problems are the shipped organism's (its seed-0 split), so no
held-out problem is ever trained on. The report scores, on held-out pairs, the interchange through the planted
subspace, through a random 2-d subspace (seed ``control_seed``) and through the planted subspace of the shipped
organism before training.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedModel

from experiments.backends import backend_with
from experiments.organism_training import adamw_with_warmup_cosine, seed_training
from experiments.backends.sites import Site, SiteEdit
from tasks.general_addition.causal_models import build_addition_model, carries_of, setting_from_addends
from tasks.general_addition.organism import (
    ORGANISM_DIR,
    PLANTED_ALIGNED_DIR,
    PLANTED_ROTATED_DIR,
    PLANTED_SPEC_FILE,
    PlantedSpec,
)
from tasks.general_addition.organism.train_organism import (
    WIDTHS,
    AdditionData,
    Problem,
    TrainConfig,
    accuracy_by_width,
    encode_training_batch,
)

BasisKind = Literal["aligned", "rotated"]
VARIABLE = "carry_0"
POSITION = "digit_1_0"
COMPONENT = "block_output"
OUT_DIRS: dict[str, Path] = {"aligned": PLANTED_ALIGNED_DIR, "rotated": PLANTED_ROTATED_DIR}


@dataclass(frozen=True)
class PlantedConfig:
    """Hyperparameters of one planting run."""

    basis: BasisKind = "aligned"
    seed: int = 0
    steps: int = 400
    batch_size: int = 128
    frac_two_digit: float = 0.5
    iit_weight: float = 1.0
    frac_differ: float = 0.5
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    layer: int = 0
    k: int = 2
    control_seed: int = 1000
    split_seed: int = 0
    eval_pairs_two_digit: int = 2000
    eval_pairs_three_digit: int = 1000
    eval_batch_size: int = 500
    num_threads: int = 1


# ---------------------------------------------------------------------------------------------- bases and cells


def random_basis(seed: int, d: int, k: int) -> torch.Tensor:
    """(d, k) orthonormal columns: the first k columns of the Q factor of a seeded d x d Gaussian (float64 QR)."""
    gaussian = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    return q[:, :k].to(torch.float32).contiguous()


def planted_basis(kind: BasisKind, seed: int, d: int, k: int = 2) -> torch.Tensor:
    """The planted (d, k) basis: residual dimensions 0..k-1 (``aligned``) or :func:`random_basis` (``rotated``)."""
    if kind == "aligned":
        return torch.eye(d, k, dtype=torch.float32)
    if kind == "rotated":
        return random_basis(seed, d, k)
    raise ValueError(f"basis kind must be 'aligned' or 'rotated', got {kind!r}")


def interchange(base: torch.Tensor, source: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``base`` with its component in span(``basis``) taken from ``source``: x_b + (x_s - x_b) B Bᵀ."""
    return base + ((source - base) @ basis) @ basis.T


def digit_1_0_columns(attention_mask: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Column of the ``digit_1_0`` token (the ones digit of addend 1) in left-padded ``<s> a+b= ...`` rows.

    Unpadded, the token is at index 2D + 1 (``<s>``, D digits, ``+``, D digits); the row starts after its padding.
    """
    pad = attention_mask.shape[1] - attention_mask.long().sum(-1)
    return pad + 2 * torch.as_tensor(widths, dtype=torch.long) + 1


def layer_output_edit(model: PreTrainedModel, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]
                      ) -> AbstractContextManager[None]:
    """Every forward inside runs ``fn(output)`` on decoder layer ``layer``'s output (a backend site edit); it may
    return a replacement output."""
    return backend_with("edits", model).edits([SiteEdit(Site(layer, "block_output"), fn)])


def patch_columns(columns: torch.Tensor, source: torch.Tensor, basis: torch.Tensor) -> Callable:
    """Hook body: at (row b, ``columns[b]``) interchange the span of ``basis`` from ``source[b]``."""

    def fn(output: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(output.shape[0])
        return output.index_put((rows, columns), interchange(output[rows, columns], source, basis))

    return fn


# ---------------------------------------------------------------------------------------------- causal labels


@lru_cache(maxsize=None)
def _causal_model(width: int):
    return build_addition_model(width, templates=["compact"])


def carry_0(problem: Problem) -> int:
    """``carry_0`` of the true algorithm (the ones column carries)."""
    return carries_of(int(problem[0]), int(problem[1]), len(problem[0]))[0]


def counterfactual_answer(base: Problem, source: Problem) -> str:
    """The causal model's ``raw_output`` on ``base`` with ``carry_0`` interchanged from ``source``."""
    width = len(base[0])
    if len(source[0]) != width:
        raise ValueError(f"base {base} and source {source} have different widths")
    setting = lambda p: setting_from_addends(int(p[0]), int(p[1]), width)  # noqa: E731
    return _causal_model(width).run_interchange(setting(base), {VARIABLE: setting(source)})["raw_output"]


# ---------------------------------------------------------------------------------------------- pairs


def training_bases(data: AdditionData, sources: list[Problem], frac_differ: float,
                   rng: np.random.Generator) -> list[Problem]:
    """One fresh training base per source, same width; with probability ``frac_differ`` its carry_0 differs."""
    want = [carry_0(s) ^ int(rng.random() < frac_differ) for s in sources]
    bases: list[Problem | None] = [None] * len(sources)
    while any(b is None for b in bases):
        for width in WIDTHS:
            todo = [i for i, s in enumerate(sources) if bases[i] is None and len(s[0]) == width]
            if not todo:
                continue
            for i, candidate in zip(todo, data.sample_width(width, len(todo))):
                if carry_0(candidate) == want[i]:
                    bases[i] = candidate
    return bases  # type: ignore[return-value]


def heldout_pairs(problems: list[Problem], n: int, frac_differ: float, seed: int) -> list[tuple[Problem, Problem]]:
    """``n`` (base, source) pairs of distinct held-out problems; a ``frac_differ`` share differ in carry_0."""
    rng = np.random.default_rng(seed)
    by_carry = {c: [p for p in problems if carry_0(p) == c] for c in (0, 1)}
    pairs = []
    while len(pairs) < n:
        base = problems[int(rng.integers(len(problems)))]
        pool = by_carry[carry_0(base) ^ int(rng.random() < frac_differ)]
        source = pool[int(rng.integers(len(pool)))]
        if source != base:
            pairs.append((base, source))
    return pairs


# ---------------------------------------------------------------------------------------------- runs


def source_states(model: PreTrainedModel, layer: int, batch: dict[str, torch.Tensor], widths: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, layer output at each row's ``digit_1_0`` token) of a forward on ``batch``."""
    kept: list[torch.Tensor] = []
    with layer_output_edit(model, layer, lambda out: kept.append(out)):
        loss = model(**batch).loss
    rows = torch.arange(len(widths))
    return loss, kept[0][rows, digit_1_0_columns(batch["attention_mask"], widths)]


def patched_forward(model: PreTrainedModel, layer: int, batch: dict[str, torch.Tensor], widths: list[int],
                    source: torch.Tensor, basis: torch.Tensor):
    """Forward on ``batch`` with the ``digit_1_0`` cell's span(``basis``) taken from ``source`` (one row each)."""
    columns = digit_1_0_columns(batch["attention_mask"], widths)
    with layer_output_edit(model, layer, patch_columns(columns, source, basis)):
        return model(**batch)


@torch.no_grad()
def interchange_correct(model: PreTrainedModel, tokenizer, pairs: list[tuple[Problem, Problem]], basis: torch.Tensor,
                        layer: int, batch_size: int = 500) -> np.ndarray:
    """Per pair: greedy decoding after the interchange writes exactly the counterfactual answer then ``</s>``.

    Checked teacher forced (one forward): greedy writes the label iff every label token, ``</s>`` included, is the
    argmax given the label's earlier tokens. The intervention touches the prompt's ``digit_1_0`` cell only.
    """
    model.eval()
    vocab, ids = tokenizer.get_vocab(), (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    out: list[bool] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        bases, sources = [b for b, _ in chunk], [s for _, s in chunk]
        widths = [len(b[0]) for b in bases]
        _, x_src = source_states(model, layer, encode_training_batch(sources, vocab, *ids), widths)
        batch = encode_training_batch(bases, vocab, *ids, answers=[counterfactual_answer(b, s) for b, s in chunk])
        logits = patched_forward(model, layer, batch, widths, x_src, basis).logits
        labels = batch["labels"][:, 1:]
        hit = (logits[:, :-1].argmax(-1) == labels) | (labels == -100)
        out += hit.all(-1).tolist()
    return np.array(out)


def iia_summary(correct: np.ndarray, pairs: list[tuple[Problem, Problem]]) -> dict[str, float | int]:
    """IIA over all pairs, over pairs whose carry_0 differs (the informative ones) and over the others."""
    differs = np.array([carry_0(b) != carry_0(s) for b, s in pairs])
    return {
        "all": float(correct.mean()),
        "carry_differs": float(correct[differs].mean()),
        "carry_same": float(correct[~differs].mean()),
        "n_pairs": len(pairs),
        "n_carry_differs": int(differs.sum()),
    }


def evaluate_iit(model: PreTrainedModel, tokenizer, eval_pairs: dict[int, list[tuple[Problem, Problem]]],
                 basis: torch.Tensor, cfg: PlantedConfig) -> dict[str, dict]:
    return {f"{w}_digit": iia_summary(interchange_correct(model, tokenizer, pairs, basis, cfg.layer,
                                                          cfg.eval_batch_size), pairs)
            for w, pairs in eval_pairs.items()}


# ---------------------------------------------------------------------------------------------- training


def train(cfg: PlantedConfig, out_dir: Path, init_dir: Path = ORGANISM_DIR) -> dict:
    """Fine-tune ``init_dir``'s organism by IIT, evaluate, save model + tokenizer + spec + report to ``out_dir``."""
    seed_training(cfg.seed, cfg.num_threads)
    start = time.time()

    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    model = LlamaForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    vocab, ids = tokenizer.get_vocab(), (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    d = model.config.hidden_size
    basis = planted_basis(cfg.basis, cfg.seed, d, cfg.k)
    control = random_basis(cfg.control_seed, d, cfg.k)

    # The shipped organism's held-out split (seed 0); training batches come from their own seeded stream.
    data = AdditionData(TrainConfig(seed=cfg.split_seed, frac_two_digit=cfg.frac_two_digit))
    data.rng = np.random.default_rng([cfg.seed, 1])
    pair_rng = np.random.default_rng([cfg.seed, 2])
    eval_pairs = {
        2: heldout_pairs(data.heldout_problems(2), cfg.eval_pairs_two_digit, cfg.frac_differ, seed=12345),
        3: heldout_pairs(data.heldout_problems(3), cfg.eval_pairs_three_digit, cfg.frac_differ, seed=12346),
    }
    before = evaluate_iit(model, tokenizer, eval_pairs, basis, cfg)

    optimizer, scheduler = adamw_with_warmup_cosine(model.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup_steps,
                                                    cfg.steps, cfg.min_lr_ratio)
    task_losses: list[float] = []
    iit_losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc=f"plant {cfg.basis}", mininterval=2.0)
    for step in bar:
        sources = data.sample(cfg.batch_size)
        widths = [len(s[0]) for s in sources]
        task_loss, x_src = source_states(model, cfg.layer, encode_training_batch(sources, vocab, *ids), widths)
        bases = training_bases(data, sources, cfg.frac_differ, pair_rng)
        labels = [counterfactual_answer(b, s) for b, s in zip(bases, sources)]
        iit_loss = patched_forward(model, cfg.layer, encode_training_batch(bases, vocab, *ids, answers=labels),
                                   widths, x_src, basis).loss
        loss = task_loss + cfg.iit_weight * iit_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        task_losses.append(task_loss.item())
        iit_losses.append(iit_loss.item())
        if step % 25 == 0:
            bar.set_postfix(task=f"{np.mean(task_losses[-25:]):.4f}", iit=f"{np.mean(iit_losses[-25:]):.4f}")
    train_seconds = time.time() - start

    model.eval()
    acc = accuracy_by_width(model, tokenizer, data.heldout_problems(2) + data.heldout_problems(3), cfg.eval_batch_size)
    spec = PlantedSpec(variable=VARIABLE, layer=cfg.layer, component=COMPONENT, position=POSITION,
                       basis=basis.T.tolist(), basis_kind=cfg.basis, seed=cfg.seed)
    report = {
        "basis_kind": cfg.basis,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "init": f"fine-tuned from {init_dir.name}",
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": None,
        "heldout_accuracy": {f"{w}_digit": acc[w] for w in WIDTHS},
        "heldout_count": {f"{w}_digit": len(data.heldout[w]) for w in WIDTHS},
        "iit_accuracy": {
            "planted_subspace": evaluate_iit(model, tokenizer, eval_pairs, basis, cfg),
            "random_subspace": evaluate_iit(model, tokenizer, eval_pairs, control, cfg),
            "planted_subspace_before_training": before,
        },
        "random_subspace_seed": cfg.control_seed,
        "final_task_loss_mean_last_50": float(np.mean(task_losses[-50:])),
        "final_iit_loss_mean_last_50": float(np.mean(iit_losses[-50:])),
        "first_100_task_losses": [round(x, 6) for x in task_losses[:100]],
        "first_100_iit_losses": [round(x, 6) for x in iit_losses[:100]],
        "config": asdict(cfg),
        "torch_version": torch.__version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / PLANTED_SPEC_FILE).write_text(spec.model_dump_json(indent=1) + "\n")
    report["wall_seconds"] = round(time.time() - start, 1)
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--basis", choices=sorted(OUT_DIRS), required=True)
    parser.add_argument("--seed", type=int, default=PlantedConfig.seed)
    parser.add_argument("--steps", type=int, default=PlantedConfig.steps)
    parser.add_argument("--threads", type=int, default=PlantedConfig.num_threads, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: planted-<basis>/)")
    args = parser.parse_args()
    cfg = PlantedConfig(basis=args.basis, seed=args.seed, steps=args.steps, num_threads=args.threads)
    report = train(cfg, args.out or OUT_DIRS[args.basis])
    planted = report["iit_accuracy"]["planted_subspace"]["2_digit"]
    random = report["iit_accuracy"]["random_subspace"]["2_digit"]
    print(json.dumps({"wall_seconds": report["wall_seconds"], "heldout_accuracy": report["heldout_accuracy"],
                      "iia_2_digit_carry_differs": planted["carry_differs"],
                      "random_subspace_iia_2_digit_carry_differs": random["carry_differs"]}, indent=2))


if __name__ == "__main__":
    main()
