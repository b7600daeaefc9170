"""``summary.md``: the study's findings in words and numbers, written from ``summary.json``'s content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from causal.results import atomic_write_bytes


def _grade(per_format: dict) -> str:
    """`` (partial, effect +0.41)``: the paired verdict of one (format, cell), when the study computed it."""
    v = per_format.get("verdict")
    if not v:
        return ""
    return f" ({v['grade']}, effect {v['effect']:+.2f})"


def _r(r: dict[str, Any] | None) -> str:
    if not r or r.get("rate") is None:
        return "n/a"
    return f"{r['rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] ({r['k']}/{r['n']})"


def _per_layer_lines(per_layer: dict[str, dict[str, Any]]) -> list[str]:
    """One line per layer: each direction's success rate with its floor."""
    return [f"- {layer}: " + "; ".join(f"{d}: {_r(v['success'])} / floor {v['floor']['rate']:.2f}" for d, v in per.items())
            for layer, per in per_layer.items()]


def write_summary_md(out: Path, s: dict[str, Any]) -> None:
    """Write ``<out>/summary.md`` (rates as ``rate [95% CI] (k/n)``; floors = the unpatched run)."""
    lines = [f"# Decimal comparison study: {s.get('model')}", ""]
    lines += ["Rates: `rate [95% Wilson CI] (k/n)`. Floor: the same rate of the unpatched run. A verdict in "
              "parentheses (full / partial / none) is the paired test of the patched against the unpatched run on the "
              "same pairs, Holm-corrected across the cells of a format (docs/verdicts.md).", ""]
    lines += ["## One pair (9.8 vs 9.11)", ""]
    for fmt, q in s.get("quick_check", {}).items():
        lines.append(f"- `{fmt}`: answer {q['answer']!r} -> {q['outcome']}")
    if "bug_rate" in s:
        lines += ["", "## Bug rate per format (disagreeing pairs)", "", "| format | buggy | correct | unparseable |",
                  "|---|---|---|---|"]
        for fmt, r in s["bug_rate"].items():
            lines.append(f"| {fmt} | {_r(r['buggy'])} | {_r(r['correct'])} | {_r(r['unparseable'])} |")
        lines += ["", f"Buggy formats (localised below): {', '.join(s.get('buggy_formats', [])) or 'none'}"]
    if s.get("note"):
        lines += ["", s["note"]]
    if "patching_best_fix" in s:
        lines += ["", "## Layer × component patching (correct format -> buggy format, role-matched positions)", "",
                  "| cell | per format: fix rate / floor |", "|---|---|"]
        for b in s["patching_best_fix"]:
            per = "; ".join(f"{f}: {_r(v['success'])} / {v['floor']['rate']:.2f}{_grade(v)}"
                            for f, v in b["per_format"].items())
            lines.append(f"| `{b['cell_id']}` | {per} |")
        lines += ["", "Best cell per component at the matched positions:", ""]
        for comp, best in s.get("patching_best_per_component", {}).items():
            if best:
                b = best[0]
                lines.append(f"- {comp}: `{b['cell_id']}` mean fix rate {b['mean_success']:.2f}")
        lines += ["", "Reverse direction (buggy format -> correct format; break rate / floor):", ""]
        for b in s.get("patching_best_break", [])[:3]:
            per = "; ".join(f"{f}: {_r(v['success'])} / {v['floor']['rate']:.2f}{_grade(v)}"
                            for f, v in b["per_format"].items())
            lines.append(f"- `{b['cell_id']}`: {per}")
    if "generalisation" in s:
        lines += ["", "## Generalisation (held-out pairs)", ""]
        for g in s["generalisation"]:
            lines.append(f"- `{g['cell_id']}` on {g['dataset_id']}: {_r(g['success'])}, floor {g['floor']['rate']:.2f}")
    if "causal_models" in s:
        lines += ["", "## Causal models (interchange of `frac_cmp`, best cell per dataset)", ""]
        for c in s["causal_models"]:
            lines.append(f"- {c['causal_model']} on {c['dataset_id']}: {c['accuracy']:.2f} [{c['ci_low']:.2f}, "
                         f"{c['ci_high']:.2f}] at `{c['best_cell']}` (unpatched: {c['base_accuracy']:.2f})")
    if "attention_top_differing_heads" in s:
        lines += ["", "## Attention (answer position)", ""]
        for d in s["attention_top_differing_heads"]:
            lines.append(f"- {d['format']} L{d['layer']}H{d['head']}: Δ mass on decimals {d['delta_decimals']:+.2f} vs simple")
    if "transplant_layers" in s:
        lines += ["", "## Attention transplantation (all heads of a layer)", ""]
        lines += _per_layer_lines(s["transplant_layers"])
        lines += ["", "Best single heads (fix):", ""]
        for b in s.get("transplant_best_heads", []):
            lines.append(f"- `{b['cell_id']}` mean fix rate {b['mean_success']:.2f}")
    if "blocking_layers" in s:
        lines += ["", "## Blocking attention to the format's own tokens (one layer, all heads; prompt and decoding)", ""]
        lines += _per_layer_lines(s["blocking_layers"])
        lines += ["", "Best single heads (fix):", ""]
        for b in s.get("blocking_best_heads", []):
            per = "; ".join(f"{f}: {_r(v['success'])}" for f, v in b["per_format"].items())
            lines.append(f"- `{b['cell_id']}`: {per}")
    if "subsets" in s:
        lines += ["", f"## Head subsets in layer {s.get('subset_layer')} (fix direction)", "",
                  "| mode | pool | format | k | subsets | mean fix rate | share ≥ threshold |", "|---|---|---|---|---|---|---|"]
        for x in s["subsets"]:
            lines.append(f"| {x['mode']} | {x['pool']} | {x['format']} | {x['k']} | {x['subsets']} | "
                         f"{x['mean_success']:.2f} | {x['share_above_threshold']:.2f} |")
    if "head_ablation_best_fix" in s:
        lines += ["", "## Head ablation", ""]
        for b in s["head_ablation_best_fix"] + s.get("head_ablation_best_break", []):
            per = "; ".join(f"{f}: {_r(v['success'])} / floor {v['floor']['rate']:.2f}" for f, v in b["per_format"].items())
            lines.append(f"- `{b['cell_id']}`: {per}")
    if "neurons" in s:
        n = s["neurons"]
        lines += ["", f"## MLP neuron ablation (layer {n['layer']})", ""]
        for r in n["results"]:
            fixes = "; ".join(f"{k}: {_r(v)}" for k, v in r.items() if k.startswith("fix."))
            lines.append(f"- {r['n_neurons']} neuron(s): {fixes}; simple still correct {_r(r['correct_format_still_correct'])}")
        lines.append("- floors: " + "; ".join(f"{k}: {_r(v)}" for k, v in n["floors"].items()))
    if s.get("figures"):
        lines += ["", "## Figures", ""] + [f"- `figures/{f}`" for f in s["figures"]]
    lines += ["", f"Run time: {s.get('seconds')} s", ""]
    atomic_write_bytes(out / "summary.md", "\n".join(lines).encode())
