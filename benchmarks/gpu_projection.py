"""Projected GPU time of a full residual-stream study from its FLOP count (no GPU needed: a projection).

Counts the FLOPs of every variant of ``benchmarks/patching_sweep.py`` for a model shape (weights on the
meta device: nothing is downloaded or allocated) and a study (pairs, prompt length, patched columns,
answer tokens), then divides by an assumed sustained throughput (peak × utilisation).

    python benchmarks/gpu_projection.py                 # Llama-3.1-8B shape, 256 pairs, bf16 on H100/A100
    python benchmarks/gpu_projection.py --columns 8 9 11 12 15 --tokens 16 --new-tokens 5 --utilisation 0.4
"""

from __future__ import annotations

import argparse
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
        times = " | ".join(f"{f / (peak * 1e12 * args.utilisation):.0f}" for peak in PEAKS.values())
        print(f"| {name} | {f / 1e15:.2f} | {f / ref:.2f} | {times} |")


if __name__ == "__main__":
    main()
