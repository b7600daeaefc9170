"""Train the continuous-thought organism from a seed on CPU.

Usage: ``python -m tasks.ct_positions.organism.train_organism [--seed 0] [--steps N] [--out DIR]``.

Recipe. Problems: :func:`tasks.ct_positions.data.generate_problems` structures (2-4 operations among
add/sub/mul/div, start 1..9, arguments 1..4, every intermediate in 0..99) in the compact rendering
``"7+4-2*3/2="``, training split only (the held-out split is fixed by a hash of the structure). Input ``<s> question <bot>``; six thoughts
``CT_j`` fed back through the CODI-style projection; then ``<eot>`` and the answer digits + ``</s>``.
Loss = answer cross-entropy (teacher forcing after ``<eot>``) + ``aux_weight`` x the mean over
thoughts of a read-out cross-entropy: the last-layer state at ``CT_j`` must decode (through a
Linear(d, 100) read-out) the step that :func:`tasks.ct_positions.causal_models.default_assignment`
gives slot ``ct_j`` for the problem's number of operations (n=3: steps 1,1,2,2,3,3; n=4: 1,2,3,4,4,4;
n=2: 1,1,2,2,2,2). Gradients flow through all thoughts (the KV cache keeps the graph). Batches are
left padded with position ids from the attention mask, as the runner decodes them.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from tasks.ct_positions.latent_reasoning import CODIProjection, LatentConfig, LatentReasoner
from experiments.organism_training import adamw_with_warmup_cosine, seed_training
from experiments.backends.transformers_adapter import output_cache, with_cache
from tasks.ct_positions.causal_models import CT_SLOTS, default_assignment
from tasks.ct_positions.data import Problem, generate_problems, is_heldout, problem_from_structure, sample_structure
from tasks.ct_positions.organism import BOT, EOT, N_VALUES, ORGANISM_DIR, build_tokenizer

NUM_THOUGHTS = len(CT_SLOTS)


class TrainConfig(BaseModel):
    """Hyperparameters of one training run."""

    seed: int = 0
    steps: int = 450
    batch_size: int = 64
    lr: float = 5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    aux_weight: float = 1.0
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 192
    projection_size: int = 96
    n_heldout: int = 600
    num_threads: int = 1
    max_minutes: float | None = Field(None, description="safety stop (makes the run machine-dependent)")


def thought_targets(problem: Problem) -> list[int]:
    """Value each thought should hold: the step the default CT assignment gives its slot."""
    steps = [int(v) for v in problem.intermediates] + [int(problem.gold)]
    assignment = default_assignment(problem.n_ops)
    return [steps[int(assignment[slot].split("_")[1]) - 1] for slot in CT_SLOTS]


def sample_train(rng: random.Random, n: int) -> list[Problem]:
    out = []
    while len(out) < n:
        start, ops, args = sample_structure(rng, rng.choice((2, 3, 4)))
        if not is_heldout(start, ops, args):
            out.append(problem_from_structure(start, ops, args, "train", style="compact"))
    return out


def build_model(cfg: TrainConfig, vocab_size: int, tok) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_heads, max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                               do_sample=False)
    return model


def training_loss(model: LlamaForCausalLM, projection: CODIProjection, readout: torch.nn.Linear, tok,
                  problems: list[Problem], aux_weight: float) -> tuple[torch.Tensor, float, float]:
    """Answer CE + aux_weight x mean read-out CE over thoughts; returns (loss, answer CE, read-out CE)."""
    bot, eot = tok.convert_tokens_to_ids(BOT), tok.convert_tokens_to_ids(EOT)
    vocab = tok.get_vocab()
    rows = [[tok.bos_token_id] + [vocab[c] for c in p.question] + [bot] for p in problems]
    width = max(map(len, rows))
    bsz = len(rows)
    ids = torch.full((bsz, width), tok.pad_token_id)
    mask = torch.zeros((bsz, width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, output_hidden_states=True)
    cache, hidden = output_cache(out), out.hidden_states[-1][:, -1]
    targets = torch.tensor([thought_targets(p) for p in problems])
    aux = []
    for j in range(NUM_THOUGHTS):
        emb = projection(hidden)
        mask = torch.cat([mask, torch.ones(bsz, 1, dtype=torch.long)], -1)
        out = model(**with_cache(model, {"inputs_embeds": emb[:, None], "attention_mask": mask,
                                         "position_ids": pos[:, -1:] + j + 1, "use_cache": True,
                                         "output_hidden_states": True}, cache))
        cache, hidden = output_cache(out), out.hidden_states[-1][:, -1]
        aux.append(torch.nn.functional.cross_entropy(readout(hidden), targets[:, j]))
    answers = [[eot] + [vocab[c] for c in p.gold] + [tok.eos_token_id] for p in problems]
    n = max(map(len, answers))
    a_ids = torch.full((bsz, n), tok.pad_token_id)
    a_mask = torch.zeros((bsz, n), dtype=torch.long)
    labels = torch.full((bsz, n), -100)
    for b, a in enumerate(answers):
        a_ids[b, : len(a)] = torch.tensor(a)
        a_mask[b, : len(a)] = 1
        labels[b, : len(a) - 1] = torch.tensor(a[1:])
    a_pos = pos[:, -1:] + NUM_THOUGHTS + 1 + torch.arange(n)[None]
    out = model(**with_cache(model, {"input_ids": a_ids, "attention_mask": torch.cat([mask, a_mask], -1),
                                     "position_ids": a_pos, "use_cache": True}, cache))
    answer_ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1))
    aux_ce = torch.stack(aux).mean()
    return answer_ce + aux_weight * aux_ce, answer_ce.item(), aux_ce.item()


def latent_config(tok) -> LatentConfig:
    return LatentConfig(num_thoughts=NUM_THOUGHTS, bot_ids=[tok.convert_tokens_to_ids(BOT)],
                        eot_ids=[tok.convert_tokens_to_ids(EOT)], max_new_tokens=4, stop_ids=[tok.eos_token_id],
                        attention_mask_in_latent=True)


@torch.no_grad()
def evaluate(reasoner: LatentReasoner, readout: torch.nn.Linear, problems: list[Problem]) -> dict:
    """Held-out answer accuracy (overall and per n_ops) and read-out accuracy per thought."""
    runs = reasoner.run_batched([p.question for p in problems], batch_size=200)
    answers = [a for r in runs for a in r.answers]
    hidden = torch.cat([r.thought_hidden for r in runs])
    decoded = readout(hidden).argmax(-1)
    targets = torch.tensor([thought_targets(p) for p in problems])
    correct = np.array([a == p.gold for a, p in zip(answers, problems)])
    by_ops = {f"{n}_ops": float(correct[[p.n_ops == n for p in problems]].mean()) for n in (2, 3, 4)}
    return {"accuracy": float(correct.mean()), "accuracy_by_n_ops": by_ops,
            "readout_accuracy_per_thought": [round(float(x), 4) for x in (decoded == targets).float().mean(0)]}


def train(cfg: TrainConfig, out_dir: Path) -> dict:
    """Train, evaluate on the held-out split, save everything to ``out_dir``."""
    seed_training(cfg.seed, cfg.num_threads)
    rng = random.Random(f"ct-organism-{cfg.seed}")
    start = time.time()
    tok = build_tokenizer()
    model = build_model(cfg, len(tok), tok)
    projection = CODIProjection(cfg.hidden_size, cfg.projection_size)
    readout = torch.nn.Linear(cfg.hidden_size, N_VALUES)
    params = list(model.parameters()) + list(projection.parameters()) + list(readout.parameters())
    optimizer, scheduler = adamw_with_warmup_cosine(params, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.steps,
                                                    cfg.min_lr_ratio)
    model.train()
    projection.train()
    history: list[tuple[float, float]] = []
    steps_done = 0
    bar = tqdm(range(cfg.steps), desc="train", mininterval=5.0)
    for step in bar:
        loss, answer_ce, aux_ce = training_loss(model, projection, readout, tok, sample_train(rng, cfg.batch_size),
                                                cfg.aux_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        history.append((answer_ce, aux_ce))
        steps_done = step + 1
        if step % 25 == 0:
            recent = np.mean(history[-25:], axis=0)
            bar.set_postfix(answer=f"{recent[0]:.3f}", readout=f"{recent[1]:.3f}")
        if cfg.max_minutes is not None and time.time() - start > cfg.max_minutes * 60:
            break
    train_seconds = time.time() - start
    model.eval()
    projection.eval()
    tok.padding_side = "left"
    reasoner = LatentReasoner(model, tok, latent_config(tok), projection)
    heldout = generate_problems(cfg.n_heldout, seed=cfg.seed, split="heldout", style="compact")
    metrics = evaluate(reasoner, readout.eval(), heldout)
    report = {
        "seed": cfg.seed, "steps_done": steps_done, "train_seconds": round(train_seconds, 1),
        "num_parameters": sum(p.numel() for p in params),
        "heldout": {"n": len(heldout), **metrics},
        "final_answer_ce_last_50": float(np.mean([h[0] for h in history[-50:]])),
        "final_readout_ce_last_50": float(np.mean([h[1] for h in history[-50:]])),
        "config": cfg.model_dump(), "torch_version": torch.__version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    weights = {f"prj.{k}": v.detach().contiguous() for k, v in projection.state_dict().items()}
    weights.update({f"readout.{k}": v.detach().contiguous() for k, v in readout.state_dict().items()})
    save_file(weights, str(out_dir / "latent.safetensors"))
    (out_dir / "latent_config.json").write_text(latent_config(tok).model_dump_json(indent=2) + "\n")
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=TrainConfig().seed)
    parser.add_argument("--steps", type=int, default=TrainConfig().steps)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--out", type=Path, default=ORGANISM_DIR)
    args = parser.parse_args()
    report = train(TrainConfig(seed=args.seed, steps=args.steps, max_minutes=args.max_minutes), args.out)
    print(json.dumps({k: report[k] for k in ("steps_done", "train_seconds", "num_parameters", "heldout")}, indent=2))


if __name__ == "__main__":
    main()
