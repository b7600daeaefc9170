"""Train the addition model organism from scratch on CPU and save it with ``save_pretrained``.

Usage: ``python -m tasks.general_addition.organism.train_organism [--seed 0] [--out DIR] [--steps N]``.

Training batches mix 2- and 3-digit problems and are left padded (with position ids computed from
the attention mask, as ``generate`` does), so the model behaves the same in padded batches.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from experiments.organism_training import adamw_with_warmup_cosine, seed_training
from tasks.general_addition.organism import ORGANISM_DIR, build_tokenizer

WIDTHS: tuple[int, ...] = (2, 3)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.02
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    frac_two_digit: float = 0.3
    frac_short_addend: float = 0.1
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 32
    heldout_two_digit_frac: float = 0.1
    heldout_three_digit: int = 2000
    eval_batch_size: int = 500
    num_threads: int = 2


Problem = tuple[str, str]


def to_problem(index: int, width: int) -> Problem:
    """Decode a pair index ``a * 10**width + b`` into zero-padded addend strings."""
    a, b = divmod(index, 10**width)
    return f"{a:0{width}d}", f"{b:0{width}d}"


def prompt_of(problem: Problem) -> str:
    """The prompt text, e.g. ``"58+67="``."""
    return f"{problem[0]}+{problem[1]}="


def answer_of(problem: Problem) -> str:
    """The expected completion (without EOS), e.g. ``"125"``."""
    return str(int(problem[0]) + int(problem[1]))


class AdditionData:
    """Held-out split (fixed by the seed) and a sampler of training problems that avoids it.

    Addends are uniform over all ``width``-digit strings, except that each addend is, with probability
    ``frac_short_addend``, replaced by a short number (fewer significant digits, e.g. ``"007"``) so that
    rare cases such as ``"000+001="`` are learned too.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.rng = np.random.default_rng(cfg.seed)
        n_held2 = round(cfg.heldout_two_digit_frac * 10**4)
        self.heldout: dict[int, np.ndarray] = {
            2: np.sort(self.rng.permutation(10**4)[:n_held2]),
            3: np.sort(self.rng.choice(10**6, size=cfg.heldout_three_digit, replace=False)),
        }
        self.is_heldout = {w: np.isin(np.arange(10 ** (2 * w)), self.heldout[w]) for w in WIDTHS}
        self.frac_two_digit = cfg.frac_two_digit
        self.frac_short_addend = cfg.frac_short_addend

    def _addends(self, width: int, n: int) -> np.ndarray:
        """``n`` addend values of one width, some of them short."""
        values = self.rng.integers(0, 10**width, size=n)
        short = self.rng.random(n) < self.frac_short_addend
        values[short] = self.rng.integers(0, 10 ** self.rng.integers(0, width, size=int(short.sum())))
        return values

    def _pair_indices(self, width: int, n: int) -> np.ndarray:
        """``n`` training pair indices ``a * 10**width + b``, resampling held-out pairs."""
        pairs = self._addends(width, n) * 10**width + self._addends(width, n)
        while (bad := self.is_heldout[width][pairs]).any():
            pairs[bad] = self._pair_indices(width, int(bad.sum()))
        return pairs

    def sample_width(self, width: int, n: int) -> list[Problem]:
        """Sample ``n`` training problems of one width (same distribution as :meth:`sample`'s problems of that width)."""
        return [to_problem(int(i), width) for i in self._pair_indices(width, n)]

    def sample(self, n: int) -> list[Problem]:
        """Sample ``n`` training problems, a ``frac_two_digit`` share of them 2-digit."""
        n_two = int(self.rng.binomial(n, self.frac_two_digit))
        return [to_problem(int(i), 2) for i in self._pair_indices(2, n_two)] + [
            to_problem(int(i), 3) for i in self._pair_indices(3, n - n_two)
        ]

    def heldout_problems(self, width: int) -> list[Problem]:
        """All held-out problems of one width."""
        return [to_problem(int(i), width) for i in self.heldout[width]]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting from the first real token (as ``generate`` computes them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_training_batch(
    problems: list[Problem], vocab: dict[str, int], bos: int, eos: int, pad: int, answers: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded ``<s> prompt answer </s>`` sequences; loss only on answer tokens and EOS.

    ``answers`` replaces the true sums as targets (e.g. counterfactual labels); default ``answer_of`` each problem.
    """
    if answers is not None and len(answers) != len(problems):
        raise ValueError(f"{len(answers)} answers for {len(problems)} problems")
    rows: list[tuple[list[int], int]] = []
    for i, p in enumerate(problems):
        prompt = [bos] + [vocab[c] for c in prompt_of(p)]
        target = [vocab[c] for c in (answer_of(p) if answers is None else answers[i])] + [eos]
        rows.append((prompt + target, len(target)))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (ids, n_target) in enumerate(rows):
        input_ids[r, length - len(ids) :] = torch.tensor(ids)
        attention_mask[r, length - len(ids) :] = 1
        labels[r, length - n_target :] = input_ids[r, length - n_target :]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "labels": labels,
    }


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], batch_size: int = 500
) -> list[str]:
    """Greedy completions (left-padded batches), decoded up to and including EOS, padding removed."""
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(problems), batch_size):
        batch = tokenizer([prompt_of(p) for p in problems[start : start + batch_size]], padding=True, return_tensors="pt")
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += [t.replace(tokenizer.pad_token, "") for t in tokenizer.batch_decode(new_tokens)]
    return outputs


def accuracy_by_width(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], batch_size: int = 500
) -> dict[int, float]:
    """Exact-match accuracy (answer then EOS) per addend width, evaluated in mixed shuffled batches."""
    order = list(range(len(problems)))
    random.Random(0).shuffle(order)
    shuffled = [problems[i] for i in order]
    completions = generate_answers(model, tokenizer, shuffled, batch_size)
    correct: dict[int, list[bool]] = {}
    for p, out in zip(shuffled, completions):
        correct.setdefault(len(p[0]), []).append(out == answer_of(p) + tokenizer.eos_token)
    return {w: float(np.mean(c)) for w, c in sorted(correct.items())}


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by ``cfg`` with generation defaults for greedy decoding."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        do_sample=False,
        max_new_tokens=5,
    )
    return model


def train(cfg: TrainConfig, out_dir: Path) -> dict:
    """Train, evaluate on the held-out problems, save model + tokenizer + report to ``out_dir``."""
    seed_training(cfg.seed, cfg.num_threads)
    start = time.time()

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    data = AdditionData(cfg)
    model = build_model(cfg, tokenizer)
    optimizer, scheduler = adamw_with_warmup_cosine(model.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup_steps,
                                                    cfg.steps, cfg.min_lr_ratio)

    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="train", mininterval=2.0)
    for step in bar:
        batch = encode_training_batch(
            data.sample(cfg.batch_size), vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    train_seconds = time.time() - start

    heldout = data.heldout_problems(2) + data.heldout_problems(3)
    acc = accuracy_by_width(model, tokenizer, heldout, cfg.eval_batch_size)
    all_two = [to_problem(i, 2) for i in range(10**4)]
    small_three = [(f"{a:03d}", f"{b:03d}") for a in range(100) for b in range(100)]
    sanity = {
        "all_2_digit_pairs": accuracy_by_width(model, tokenizer, all_two, cfg.eval_batch_size)[2],
        "3_digit_addends_below_100": accuracy_by_width(model, tokenizer, small_three, cfg.eval_batch_size)[3],
    }
    report = {
        "seed": cfg.seed,
        "steps": cfg.steps,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - start, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "heldout_accuracy": {f"{w}_digit": acc[w] for w in WIDTHS},
        "heldout_count": {f"{w}_digit": len(data.heldout[w]) for w in WIDTHS},
        "sanity_accuracy_incl_training_pairs": sanity,
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "first_100_losses": [round(x, 6) for x in losses[:100]],
        "config": asdict(cfg),
        "torch_version": torch.__version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--out", type=Path, default=ORGANISM_DIR)
    args = parser.parse_args()
    report = train(TrainConfig(seed=args.seed, steps=args.steps), args.out)
    print(json.dumps({k: report[k] for k in ("wall_seconds", "num_parameters", "heldout_accuracy")}, indent=2))


if __name__ == "__main__":
    main()
