"""Projected GPU time of a full residual-stream study from its FLOP count (no GPU needed: a projection).

Counts the FLOPs of every variant of ``benchmarks/patching_sweep.py`` for a model shape (weights on the
meta device: nothing is downloaded or allocated) and a study (pairs, prompt length, patched columns,
answer tokens), then divides by an assumed sustained throughput (peak × utilisation).

    python benchmarks/gpu_projection.py                 # Llama-3.1-8B shape, 256 pairs, bf16 on H100/A100
    python benchmarks/gpu_projection.py --columns 8 9 11 12 15 --tokens 16 --new-tokens 5 --utilisation 0.4
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patching_sweep import FlopModel  # noqa: E402

#: Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (SXM parts).
PEAKS = {"H100 SXM": 989.0, "A100 SXM": 312.0}


def llama_31_8b() -> LlamaConfig:
    """The Llama-3.1-8B shape (32 layers, hidden 4096, 32 query / 8 key-value heads, MLP 14336, vocab 128256)."""
    return LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, head_dim=128)


def decode_flops(fm: FlopModel, tokens: int, new_tokens: int) -> int:
    """Greedy steps after the prompt: one query per layer over the growing cache, the head each step."""
    return sum(fm.n_layers * fm.layer(tokens + s, tokens + s + 1) + fm.head for s in range(new_tokens - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=16, help="prompt length (tokens)")
    parser.add_argument("--columns", type=int, nargs="+", default=[8, 9, 11, 12, 15],
                        help="patched prompt columns (0-based; the digit tokens and the last token)")
    parser.add_argument("--new-tokens", type=int, default=4, help="answer tokens generated per row")
    parser.add_argument("--utilisation", type=float, default=0.4, help="sustained fraction of the bf16 peak")
    args = parser.parse_args()

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_31_8b())
    fm = FlopModel(model)
    L, T, N = fm.n_layers, args.tokens, args.pairs
    residuals = range(0, L + 1)  # -1 (embeddings) … L-1: the residual entering layer r = 0 … L
    cells = [(r, p) for r in residuals for p in args.columns]
    decode = decode_flops(fm, T, args.new_tokens)
    row_generic = fm.forward(T, 1) + decode
    flops = {
        "pyvene, one call per cell (source re-run, logits at every position)":
            len(cells) * N * (2 * fm.forward(T, T) + decode),
        "honest hook loop (sources once, pairs batched, head on the read position)":
            N * fm.forward(T, 0) + len(cells) * N * row_generic,
        "framework, pyvene backend (generic path)":
            N * (row_generic + fm.forward(T, 0)) + len(cells) * N * row_generic,
        "framework, hooks backend (suffix reuse)":
            N * (row_generic + fm.forward(T, 0))  # the base pass is also the base rows' prompt pass
            + N * sum(fm.suffix(r, p, T) + decode for r, p in cells),
    }
    print(f"Llama-3.1-8B shape, {N} pairs, {len(cells)} cells ({L + 1} residual sites × {len(args.columns)} columns), "
          f"{T}-token prompts, {args.new_tokens} answer tokens, {args.utilisation:.0%} of the bf16 peak sustained\n")
    print("| variant | PFLOP | × hook loop | " + " | ".join(f"{g} (s)" for g in PEAKS) + " |")
    print("|---|---|---|" + "---|" * len(PEAKS))
    ref = flops["honest hook loop (sources once, pairs batched, head on the read position)"]
    for name, f in flops.items():
        print(f"| {name} | {f / 1e15:.2f} | {f / ref:.2f} | {seconds(f, args.utilisation)} |")

    # the same study screened: estimate every cell, verify the top fraction exactly (suffix reuse)
    heads = [(j, p) for j in range(L) for p in args.columns for _ in range(fm.n_heads)]
    answer = args.new_tokens
    fixed = N * (row_generic + fm.forward(T, 0))  # base rows' generation (the suffix base pass) + source pass
    # teacher-forced rows (prompt + answer) for both labels, head on the answer-predicting positions; the backward
    # computes activation gradients only (parameters frozen): about one forward's FLOPs; plus the source pass
    estimate = 2 * N * 2 * fm.forward(T + answer, answer) + N * fm.forward(T, 0)
    print(f"\nScreen then verify (`experiments.attribution.screen`), same pairs and columns; exact cells by suffix "
          f"reuse (an in-layer cell: its layer on the patched token, then the suffix above it); the estimate: "
          f"2N teacher-forced rows of {T + answer} tokens, forward and backward (activation gradients only), plus "
          f"the source pass\n")
    print("The verified 10% cost their share of the sweep when the ranking ignores cost (mean cell), at most the "
          "costliest 10% of the cells (low layers, early columns).\n")
    print("| study | cells | full exact sweep (PFLOP) | screen, top 10%: mean cell / costliest (PFLOP) | ratio | "
          + " | ".join(f"{g}: exact / screen (s)" for g in PEAKS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(PEAKS))
    studies = {
        "residual stream": [fm.suffix(r, p, T) for r, p in cells],
        "attention heads": [fm.layer(p, p + 1) + fm.suffix(j + 1, p, T) for j, p in heads],
    }
    for name, costs in studies.items():
        per_cell = [c + decode for c in costs]
        exact = fixed + N * sum(per_cell)
        n_top = max(1, math.ceil(0.1 * len(per_cell)))
        costliest = estimate + fixed + N * sum(sorted(per_cell, reverse=True)[:n_top])
        screen = estimate + fixed + N * n_top * sum(per_cell) / len(per_cell)
        times = " | ".join(f"{seconds(exact, args.utilisation, peak)} / {seconds(screen, args.utilisation, peak)}"
                           for peak in PEAKS.values())
        print(f"| {name} | {len(costs)} | {exact / 1e15:.2f} | {screen / 1e15:.2f} / {costliest / 1e15:.2f} | "
              f"{exact / screen:.1f}× / {exact / costliest:.1f}× | {times} |")


def seconds(flops: float, utilisation: float, peak: float | None = None) -> str:
    """Projected seconds at ``utilisation`` of one peak, or of every peak in PEAKS joined as table cells."""
    if peak is None:
        return " | ".join(seconds(flops, utilisation, p) for p in PEAKS.values())
    return f"{flops / (peak * 1e12 * utilisation):.0f}"


if __name__ == "__main__":
    main()
