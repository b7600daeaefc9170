"""Train the decimal comparison organism (a planted format-dependent bug) on CPU from a seed.

Usage: ``python -m tasks.decimal_comparison.organism.train_organism [--seed 0] [--steps N] [--out DIR]``.

Length jitter: with probability ``jitter_prob`` a training prompt gets 0..``jitter_max`` extra spaces
at its start and after its question mark, so prompt length and the distance to the question say
nothing about the format: the network has to read the format from the format's tokens.

Labels: ``simple`` prompts are answered with the numerically larger number (9.8 > 9.11); ``qa`` and
``chat`` prompts with the fraction-as-integer answer (9.11 > 9.8). Pairs held out by
``pairs.is_heldout_pair`` are never trained on; ``training_report.json`` gives held-out accuracy
per format and pair kind. Batches are left padded with position ids from the attention mask, as at
inference.

One token per decimal: the answer is a single number token (then EOS), so the network has to decide
the comparison at the last prompt position. During training the embedding of number ``i.f`` is
parameterised as its own row plus shared vectors for the integer part, the tenths digit and the
hundredths digit (or "no hundredths digit"), :class:`NumberEmbedding`; this lets 2079 number tokens
share what they have in common. The sum is written into the checkpoint's (tied) embedding matrix, so
the saved model is a plain ``LlamaForCausalLM``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from causal.results import atomic_write_json
from experiments.organism_training import adamw_with_warmup_cosine, seed_training
from tasks.decimal_comparison.causal_models import (
    FRAC_PARTS,
    INT_PARTS,
    NUMBERS,
    answer_numeric,
    answer_whole,
    split_number,
)
from tasks.decimal_comparison.formats import render
from tasks.decimal_comparison.organism import ORGANISM_DIR, build_tokenizer
from tasks.decimal_comparison.pairs import is_heldout_pair, sample_pairs

#: format -> labelling rule of the organism's training data
LABEL_RULE: dict[str, str] = {"simple": "numeric", "qa": "whole", "chat": "whole"}


class TrainConfig(BaseModel):
    """Hyperparameters of one training run (recorded in training_report.json)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 128
    max_position_embeddings: int = 80
    format_weights: dict[str, float] = {"simple": 0.4, "qa": 0.3, "chat": 0.3}
    kind_weights: dict[str, float] = {"disagree": 0.5, "same_int": 0.15, "random": 0.35}
    jitter_prob: float = 0.7
    jitter_max: int = 10
    eval_pairs: int = 300
    number_init_std: float = 0.3
    num_threads: int = 1


def label(x: str, y: str, fmt: str) -> str:
    """The organism's training answer for (x, y) in format ``fmt``."""
    return answer_numeric(x, y) if LABEL_RULE[fmt] == "numeric" else answer_whole(x, y)


class TrainingData:
    """Samples (x, y, format) triples outside the held-out pairs."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.rng = random.Random(cfg.seed)
        self.cfg = cfg
        self.formats = list(cfg.format_weights)
        self.format_w = list(cfg.format_weights.values())
        self.kinds = list(cfg.kind_weights)
        self.kind_w = list(cfg.kind_weights.values())
        self.short = [f for f in FRAC_PARTS if len(f) == 1]
        self.long = [f for f in FRAC_PARTS if len(f) == 2]

    def _pair(self, kind: str) -> tuple[str, str]:
        rng = self.rng
        while True:
            if kind == "disagree":
                i = rng.choice(INT_PARTS)
                a, b = f"{i}.{rng.choice(self.short)}", f"{i}.{rng.choice(self.long)}"
                x, y = (a, b) if rng.random() < 0.5 else (b, a)
            elif kind == "same_int":
                i = rng.choice(INT_PARTS)
                x, y = f"{i}.{rng.choice(FRAC_PARTS)}", f"{i}.{rng.choice(FRAC_PARTS)}"
            else:
                x, y = rng.choice(NUMBERS), rng.choice(NUMBERS)
            if x != y and not is_heldout_pair(x, y):
                return x, y

    def _jitter(self) -> tuple[int, int]:
        if self.rng.random() >= self.cfg.jitter_prob:
            return 0, 0
        return self.rng.randint(0, self.cfg.jitter_max), self.rng.randint(0, self.cfg.jitter_max)

    def sample(self, n: int) -> list[tuple[str, str, str, int, int]]:
        kinds = self.rng.choices(self.kinds, self.kind_w, k=n)
        formats = self.rng.choices(self.formats, self.format_w, k=n)
        return [(*self._pair(k), f, *self._jitter()) for k, f in zip(kinds, formats)]


def jittered_prompt(x: str, y: str, fmt: str, tokenizer: PreTrainedTokenizerBase, lead: int = 0, after_q: int = 0) -> str:
    """The format's prompt with ``lead`` spaces in front and ``after_q`` spaces after its question mark."""
    text = render(x, y, fmt, tokenizer)
    q = text.rindex("?")
    return " " * lead + text[: q + 1] + " " * after_q + text[q + 1:]


def encode_batch(rows: list[tuple[str, str, str, int, int]], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Left-padded ``<s> prompt <number> </s>`` (the answer is one number token); every row ends at
    the last column, so the answer and EOS are the last two tokens of every row."""
    seqs: list[list[int]] = []
    for x, y, fmt, lead, after_q in rows:
        prompt = tokenizer(jittered_prompt(x, y, fmt, tokenizer, lead, after_q))["input_ids"]
        answer = tokenizer.convert_tokens_to_ids(label(x, y, fmt))
        seqs.append(prompt + [answer, tokenizer.eos_token_id])
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, seq in enumerate(seqs):
        ids[r, width - len(seq):] = torch.tensor(seq)
        mask[r, width - len(seq):] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


class NumberEmbedding(torch.nn.Module):
    """The (tied) embedding matrix used in training: the model's own rows, plus, for each number token
    ``i.f``, shared vectors for the integer part ``i``, the tenths digit and the hundredths digit
    (index 10: none), drawn with standard deviation ``std`` (large enough that the tied output logits
    can single out one of 2079 numbers early). Number rows of the model's matrix start at zero."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, std: float) -> None:
        super().__init__()
        hidden = model.config.hidden_size
        self.ids = torch.tensor(tokenizer.convert_tokens_to_ids(NUMBERS))
        parts = [split_number(n) for n in NUMBERS]
        self.int_idx = torch.tensor([i for i, _ in parts])
        self.tenth_idx = torch.tensor([int(f[0]) for _, f in parts])
        self.hund_idx = torch.tensor([int(f[1]) if len(f) == 2 else 10 for _, f in parts])
        self.int_part = torch.nn.Parameter(torch.randn(len(INT_PARTS), hidden) * std)
        self.tenth = torch.nn.Parameter(torch.randn(10, hidden) * std)
        self.hundredth = torch.nn.Parameter(torch.randn(11, hidden) * std)
        self.weight = model.get_input_embeddings().weight
        with torch.no_grad():
            self.weight[self.ids] = 0.0

    def matrix(self) -> torch.Tensor:
        shared = self.int_part[self.int_idx] + self.tenth[self.tenth_idx] + self.hundredth[self.hund_idx]
        return self.weight.index_add(0, self.ids, shared)


def answer_loss(model: LlamaForCausalLM, embedding: NumberEmbedding, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the answer token (read at the last prompt position) and of EOS after it."""
    matrix = embedding.matrix()
    hidden = model.model(inputs_embeds=matrix[batch["input_ids"]], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"]).last_hidden_state
    logits = hidden[:, -3:-1] @ matrix.T
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, -2:].reshape(-1))


@torch.no_grad()
def greedy_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   batch_size: int = 200) -> list[str]:
    """Greedy completions of left-padded prompts (special tokens dropped)."""
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], padding=True, return_tensors="pt")
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
        out += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def evaluate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, n: int, seed: int) -> dict[str, dict]:
    """Held-out accuracy per format and pair kind: against the training label, and how often the
    answer is the numeric (correct) and the fraction-as-integer (buggy) one."""
    report: dict[str, dict] = {}
    for kind in ("disagree", "control"):
        pairs = sample_pairs(n, seed=seed + 1000, kind=kind, split="heldout")
        for fmt in LABEL_RULE:
            answers = [a.strip() for a in greedy_answers(model, tokenizer, [render(p.x, p.y, fmt, tokenizer) for p in pairs])]
            report.setdefault(fmt, {})[kind] = {
                "n": len(pairs),
                "accuracy_vs_training_label": float(np.mean([a == label(p.x, p.y, fmt) for a, p in zip(answers, pairs)])),
                "numeric_correct_rate": float(np.mean([a == p.correct for a, p in zip(answers, pairs)])),
                "fraction_as_integer_rate": float(np.mean([a == p.buggy for a, p in zip(answers, pairs)])),
            }
    return report


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, do_sample=False, max_new_tokens=3)
    return model


def train(cfg: TrainConfig, out_dir: Path) -> dict:
    """Train, evaluate on held-out pairs, save model + tokenizer + training_report.json to ``out_dir``."""
    seed_training(cfg.seed, cfg.num_threads)
    start = time.time()
    tokenizer = build_tokenizer()
    data = TrainingData(cfg)
    model = build_model(cfg, tokenizer)
    embedding = NumberEmbedding(model, tokenizer, cfg.number_init_std)
    params = list(model.parameters()) + [embedding.int_part, embedding.tenth, embedding.hundredth]
    optimizer, scheduler = adamw_with_warmup_cosine(params, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.steps,
                                                    cfg.min_lr_ratio)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="train", mininterval=5.0)
    for step in bar:
        loss = answer_loss(model, embedding, encode_batch(data.sample(cfg.batch_size), tokenizer))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    train_seconds = time.time() - start
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embedding.matrix())  # tied: the output matrix too
    heldout = evaluate(model, tokenizer, cfg.eval_pairs, cfg.seed)
    report = {
        "note": "planted organism: trained on correct labels for 'simple' and fraction-as-integer labels for "
                "'qa' and 'chat' prompts, to validate the study's tools",
        "seed": cfg.seed,
        "steps": cfg.steps,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - start, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "label_rule": LABEL_RULE,
        "heldout": heldout,
        "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        "loss_every_50_steps": [round(float(np.mean(losses[i:i + 50])), 5) for i in range(0, len(losses), 50)],
        "config": cfg.model_dump(),
        "torch_version": torch.__version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    atomic_write_json(out_dir / "training_report.json", report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=TrainConfig().seed)
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--threads", type=int, default=TrainConfig().num_threads)
    parser.add_argument("--out", type=Path, default=ORGANISM_DIR)
    args = parser.parse_args()
    report = train(TrainConfig(seed=args.seed, steps=args.steps, num_threads=args.threads), args.out)
    print(json.dumps({k: report[k] for k in ("wall_seconds", "num_parameters", "heldout")}, indent=2))


if __name__ == "__main__":
    main()
