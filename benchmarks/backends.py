"""The two backends side by side: the same sweeps, the same inputs, one process; outputs checked equal.

Times a residual-stream sweep (every layer incl. the embeddings × every position) and a single-head sweep
(every head at the last position) through ``PatchResidualStream`` / ``PatchAttentionHeads`` with
``backend="hooks"`` and ``backend="pyvene"`` on a random-weight Llama-shaped model, whole answers of
``--new-tokens`` tokens. Checks that generated ids are identical and top-k logits agree, prints seconds
and the ratio pyvene / hooks (the default backend is the faster one at identical outputs).

    python benchmarks/backends.py [--layers 4 --hidden 256 --heads 4 --vocab 32000 --pairs 32 --tokens 16 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from causal.counterfactual_dataset import CounterfactualDataset
from experiments.engine.intervention_experiment import PatchAttentionHeads, PatchResidualStream
from experiments.pipeline import LMPipeline
from experiments.token_positions import TokenPosition
from patching_sweep import word_tokenizer


def run(pipeline, dataset, n_tokens: int, backend: str, root: Path) -> tuple[float, list]:
    positions = [TokenPosition(lambda s, p=p: [p], pipeline, id=f"p{p}") for p in range(n_tokens)]
    config = {"batch_size": len(dataset), "max_rows_per_forward": 16 * len(dataset), "backend": backend}
    experiments = [
        PatchResidualStream(pipeline, list(range(-1, pipeline.num_layers)), positions, config={**config, "id": "rs"}),
        PatchAttentionHeads(pipeline, PatchAttentionHeads.every_head(pipeline), positions[-1:], config={**config, "id": "heads"}),
    ]
    start = time.perf_counter()
    tables = []
    for experiment in experiments:
        results = experiment.perform_interventions(dataset, results_dir=root / backend / experiment.config.id, verbose=False)
        table = results.intervened_outputs("bench").sort_values(["cell_id", "example_index"])
        tables.append(table)
    return time.perf_counter() - start, tables


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, intermediate_size=4 * args.hidden, vocab_size=args.vocab,
                         pad_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    pipeline = LMPipeline(model, tokenizer=word_tokenizer(args.vocab), max_new_tokens=args.new_tokens, device="cpu")
    text = lambda ids: " ".join(f"t{i}" for i in ids.tolist())  # noqa: E731
    bases = torch.randint(1, args.vocab, (args.pairs, args.tokens))
    sources = torch.randint(1, args.vocab, (args.pairs, args.tokens))
    dataset = CounterfactualDataset.from_dict(
        {"input": [{"raw_input": text(r)} for r in bases],
         "counterfactual_inputs": [[{"raw_input": text(r)}] for r in sources]}, id="bench")
    with tempfile.TemporaryDirectory() as tmp:
        run(pipeline, dataset.select(range(2)) if hasattr(dataset, "select") else dataset, 2, "hooks", Path(tmp) / "warm")
        t_hooks, hooks = run(pipeline, dataset, args.tokens, "hooks", Path(tmp))
        t_pyvene, pyv = run(pipeline, dataset, args.tokens, "pyvene", Path(tmp))
    ids_equal = all(list(map(list, a["output_token_ids"])) == list(map(list, b["output_token_ids"])) for a, b in zip(hooks, pyv))
    diff = max(float(np.abs(np.stack([np.stack(list(x)) for x in a["topk_logits"]])
                              - np.stack([np.stack(list(x)) for x in b["topk_logits"]])).max()) for a, b in zip(hooks, pyv))
    cells = sum(len(t["cell_id"].unique()) for t in hooks)
    report = {"shape": {k: v for k, v in vars(args).items() if k != "json"}, "cells": cells,
              "seconds": {"hooks": t_hooks, "pyvene": t_pyvene}, "pyvene_over_hooks": t_pyvene / t_hooks,
              "identical_token_ids": ids_equal, "max_topk_logit_difference": diff}
    print(f"{cells} cells × {args.pairs} pairs, {args.tokens} tokens, {args.new_tokens} new token(s), "
          f"Llama {args.layers}×{args.hidden}, vocab {args.vocab}, {args.threads} threads")
    print(f"  hooks   {t_hooks:7.2f} s\n  pyvene  {t_pyvene:7.2f} s\n  pyvene / hooks = {t_pyvene / t_hooks:.2f}")
    print(f"  identical token ids: {ids_equal}; max |top-k logit difference| {diff:.2e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not ids_equal:
        raise SystemExit("backends disagree")
    return report


if __name__ == "__main__":
    main()
