"""Residual-stream patching sweep: every layer × every position, N pairs, answer read at the last position.

Times three implementations in one process on a Llama-shaped random-weight model and checks
they agree (same argmax answer per cell and pair; logits within tolerance):
  (a) pyvene called once per (layer, position) cell, the way a typical user writes the loop
      (pyvene re-runs the source forward on every call);
  (b) a plain-torch forward-hook loop that collects each source activation once and batches
      the N pairs per cell;
  (c) ``PatchResidualStream.perform_interventions`` (writes a results folder, like real use).
Prints seconds, cells/s, peak RSS growth per variant and the ratios.

    python benchmarks/patching_sweep.py [--layers 4 --hidden 256 --heads 4 --vocab 32000 --pairs 32 --tokens 16 --threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

with contextlib.redirect_stdout(io.StringIO()):
    import pyvene

from causal.counterfactual_dataset import CounterfactualDataset
from experiments.intervention_experiment import PatchResidualStream
from experiments.pipeline import LMPipeline
from experiments.token_positions import TokenPosition


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>", padding_side="left")


def sweep_a_pyvene_per_cell(model, base_ids, src_ids, n_layers, n_tokens) -> torch.Tensor:
    """(a) one pyvene call per cell; returns last-position logits (cells, N, V)."""
    out = []
    for layer in range(n_layers):
        config = pyvene.IntervenableConfig(
            model_type=type(model),
            representations=[pyvene.RepresentationConfig(layer, "block_output", "pos", 1)],
        )
        intervenable = pyvene.IntervenableModel(config, model=model)
        for pos in range(n_tokens):
            _, patched = intervenable(
                {"input_ids": base_ids}, [{"input_ids": src_ids}], {"sources->base": pos}
            )
            out.append(patched.logits[:, -1].float())
    return torch.stack(out)


def sweep_b_hooks(model, base_ids, src_ids, n_layers, n_tokens) -> torch.Tensor:
    """(b) plain forward hooks: sources collected once, N pairs batched per cell."""
    hidden: list[torch.Tensor] = []
    grab = [layer.register_forward_hook(lambda m, a, o: hidden.append(o[0] if isinstance(o, tuple) else o))
            for layer in model.model.layers[:n_layers]]
    try:
        model(input_ids=src_ids)
    finally:
        for handle in grab:
            handle.remove()
    out = []
    for layer in range(n_layers):
        source = hidden[layer]
        for pos in range(n_tokens):
            def hook(module, args, output, pos=pos, source=source):
                tensor = output[0] if isinstance(output, tuple) else output
                tensor[:, pos] = source[:, pos]
            handle = model.model.layers[layer].register_forward_hook(hook)
            try:
                out.append(model(input_ids=base_ids).logits[:, -1].float())
            finally:
                handle.remove()
    return torch.stack(out)


def sweep_c_framework(pipeline, base_ids, src_ids, n_layers, n_tokens, results_dir: Path):
    """(c) PatchResidualStream; returns (top-1 ids (cells, N), top-1 logits (cells, N))."""
    to_text = lambda ids: " ".join(f"t{i}" for i in ids.tolist())  # noqa: E731
    dataset = CounterfactualDataset.from_dict(
        {"input": [{"raw_input": to_text(r)} for r in base_ids],
         "counterfactual_inputs": [[{"raw_input": to_text(r)}] for r in src_ids]},
        id="bench",
    )
    positions = [TokenPosition(lambda s, p=p: [p], pipeline, id=f"p{p}") for p in range(n_tokens)]
    experiment = PatchResidualStream(
        pipeline, list(range(n_layers)), positions,
        config={"id": "bench", "batch_size": len(base_ids), "max_rows_per_forward": 16 * len(base_ids)},
    )
    results = experiment.perform_interventions(dataset, results_dir=results_dir, verbose=False)
    table = results.intervened_outputs("bench")
    order = {c.cell_id: i for i, c in enumerate(experiment.cells)}
    table = table.assign(o=table["cell_id"].map(order)).sort_values(["o", "example_index"])
    n = len(base_ids)
    ids = torch.tensor([t[0][0] for t in table["topk_token_ids"]]).view(-1, n)
    vals = torch.tensor([t[0][0] for t in table["topk_logits"]]).view(-1, n)
    return ids, vals


def timed(fn):
    peak_rss_reset()
    before = peak_rss_mib()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, peak_rss_mib() - before


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, intermediate_size=4 * args.hidden,
                         vocab_size=args.vocab, pad_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    pipeline = LMPipeline(model, tokenizer=word_tokenizer(args.vocab), max_new_tokens=1, device="cpu")
    base_ids = torch.randint(1, args.vocab, (args.pairs, args.tokens))
    src_ids = torch.randint(1, args.vocab, (args.pairs, args.tokens))
    cells = args.layers * args.tokens

    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        sweep_b_hooks(model, base_ids[:2], src_ids[:2], 1, 1)  # warm-up
        logits_a, t_a, m_a = timed(lambda: sweep_a_pyvene_per_cell(model, base_ids, src_ids, args.layers, args.tokens))
        logits_b, t_b, m_b = timed(lambda: sweep_b_hooks(model, base_ids, src_ids, args.layers, args.tokens))
        with tempfile.TemporaryDirectory() as tmp:
            (ids_c, vals_c), t_c, m_c = timed(
                lambda: sweep_c_framework(pipeline, base_ids, src_ids, args.layers, args.tokens, Path(tmp) / "r"))

    top_a, top_b = logits_a.argmax(-1), logits_b.argmax(-1)
    base_top = model(input_ids=base_ids).logits[:, -1].argmax(-1)
    agree_ab = bool((top_a == top_b).all())
    agree_bc = bool((top_b == ids_c).all())
    max_diff = float((logits_b.max(-1).values - vals_c).abs().max())
    changed = float((top_b != base_top[None]).float().mean())
    report = {
        "shape": vars(args) | {"json": None}, "cells": cells,
        "seconds": {"a_pyvene_per_cell": t_a, "b_hooks_batched": t_b, "c_patch_residual_stream": t_c},
        "cells_per_second": {"a": cells / t_a, "b": cells / t_b, "c": cells / t_c},
        "peak_rss_growth_mib": {"a": m_a, "b": m_b, "c": m_c},
        "ratios": {"a_over_c": t_a / t_c, "c_over_b": t_c / t_b, "a_over_b": t_a / t_b},
        "agree": {"a_vs_b_argmax": agree_ab, "b_vs_c_argmax": agree_bc, "b_vs_c_max_logit_diff": max_diff,
                  "fraction_of_outputs_changed_by_patching": changed},
        "bars": {"c_at_least_4x_faster_than_a": t_a / t_c >= 4.0, "c_within_1.5x_of_b": t_c / t_b <= 1.5},
    }
    print(f"sweep: {args.layers} layers x {args.tokens} positions = {cells} cells, {args.pairs} pairs, "
          f"hidden {args.hidden}, vocab {args.vocab}, {args.threads} threads")
    for key, name in (("a", "pyvene per cell"), ("b", "hooks, batched"), ("c", "PatchResidualStream")):
        secs = report["seconds"][[k for k in report["seconds"] if k.startswith(key)][0]]
        print(f"  ({key}) {name:22s} {secs:7.2f} s  {cells / secs:7.1f} cells/s  peak RSS +{report['peak_rss_growth_mib'][key]:.0f} MiB")
    print(f"  ratios: a/c = {t_a / t_c:.2f}x (bar >= 4)   c/b = {t_c / t_b:.2f} (bar <= 1.5)   a/b = {t_a / t_b:.2f}")
    print(f"  agreement: a==b argmax {agree_ab}, b==c argmax {agree_bc}, max |logit b - c| {max_diff:.2e}, "
          f"patching changed {changed:.0%} of answers")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not (agree_ab and agree_bc):
        raise SystemExit("implementations disagree")
    return report


if __name__ == "__main__":
    main()
