"""The decimal study's report sections: tables (and figures) from the data of its extra steps.

Each section is a function of a `StudyContext` returning markdown lines (``Task.report_sections``); the report
step puts them in ``<study>/report.md`` before the scores summary. A section whose data is missing raises
FileNotFoundError, which the report shows as "not available" in its place.
"""

from __future__ import annotations

from typing import Any

from experiments.task import StudyContext
from tasks.decimal_comparison.analyses import best_rows, critical_layers
from tasks.decimal_comparison.steps import load_data

RATES_NOTE = ("Rates: `rate [95% Wilson CI] (k/n)`. Floor: the same rate of the unpatched run. A verdict in parentheses "
              "(full / partial / none) is the paired test of the patched against the unpatched run on the same pairs, "
              "Holm-corrected across the cells of a dataset (docs/verdicts.md).")


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


def _per_layer(rows: list[dict], prefix: str, layers: list[int]) -> list[str]:
    """One line per layer: each dataset's success rate with its floor, for the all-heads cell ``<prefix>.L<l>.all``."""
    out = []
    for layer in layers:
        per = [r for r in rows if r["cell_id"] == f"{prefix}.L{layer}.all"]
        out.append(f"- L{layer}: " + "; ".join(f"{r['dataset_id']}: {_r(r['success'])} / floor {r['floor']['rate']:.2f}"
                                                for r in per))
    return out


def bug_rate_section(context: StudyContext) -> list[str]:
    """9.8 vs 9.11 per format, then the bug rate table; whether the study's format is buggy and its source correct."""
    bug = load_data(context.folder, "bug_rate")
    s = context.settings
    lines = ["## Bug rate per format (disagreeing pairs)", "", "One pair (9.8 vs 9.11):", ""]
    lines += [f"- `{fmt}`: answer {q['answer']!r} -> {q['outcome']}" for fmt, q in bug.get("quick_check", {}).items()]
    lines += ["", f"{bug['n_pairs']} disagreeing pairs per format ({bug['split']} split):", "",
              "| format | buggy | correct | unparseable | control pairs correct |", "|---|---|---|---|---|"]
    for fmt, r in bug["formats"].items():
        lines.append(f"| {fmt} | {_r(r['buggy'])} | {_r(r['correct'])} | {_r(r['unparseable'])} | "
                     f"{_r(r['control_correct'])} |")
    buggy = [f for f, r in bug["formats"].items() if r["buggy"]["rate"] >= 0.5]
    lines += ["", f"Buggy formats (bug rate ≥ 0.5): {', '.join(buggy) or 'none'}. This study patches from "
                  f"`{s.source_format}` into `{s.format}`" + ("." if s.format in buggy else
                                                           f"; `{s.format}` is not buggy here, so the fix rates below "
                                                           f"have little to fix (pass --format with a buggy one).")]
    return lines


def patching_section(context: StudyContext) -> list[str]:
    """The success metric of the step-2 sweeps: best fixing cells, best cell per component, the reverse direction."""
    patch = load_data(context.folder, "patching")
    rows, s = patch["rows"], context.settings
    lines = [f"## Layer × component patching ({s.source_format} -> {s.format}, role-matched positions)", "", RATES_NOTE,
             "", f"Fix rate: patched `{s.format}` run answers correctly (`fix` dataset); break rate: patched "
                 f"`{s.source_format}` run answers the buggy way (`break`); n = {patch['n_pairs']} pairs each.", "",
             "| cell | fix rate / floor |", "|---|---|"]
    for b in best_rows(rows, "fix", top=5):
        per = "; ".join(f"{f}: {_r(v['success'])} / {v['floor']['rate']:.2f}{_grade(v)}" for f, v in b["per_format"].items())
        lines.append(f"| `{b['cell_id']}` | {per} |")
    lines += ["", "Best cell per component at the matched positions:", ""]
    for comp in patch["components"]:
        best = best_rows([r for r in rows if r["component"] == comp and r["position_id"] == "matched"], "fix", top=1)
        if best:
            lines.append(f"- {comp}: `{best[0]['cell_id']}` mean fix rate {best[0]['mean_success']:.2f}")
    lines += ["", "Reverse direction (break rate / floor):", ""]
    for b in best_rows(rows, "break", top=3):
        per = "; ".join(f"{f}: {_r(v['success'])} / {v['floor']['rate']:.2f}{_grade(v)}" for f, v in b["per_format"].items())
        lines.append(f"- `{b['cell_id']}`: {per}")
    return lines


def generalisation_section(context: StudyContext) -> list[str]:
    gen = load_data(context.folder, "generalisation")
    lines = ["## Generalisation (held-out pairs)", ""]
    lines += [f"- `{g['cell_id']}` on {g['dataset_id']}: {_r(g['success'])}, floor {g['floor']['rate']:.2f}"
              for g in gen["rows"]]
    return lines


def attention_section(context: StudyContext) -> list[str]:
    att = load_data(context.folder, "attention")
    source = context.settings.source_format
    lines = ["## Attention (answer position)", ""]
    lines += [f"- {d['format']} L{d['layer']}H{d['head']}: Δ mass on decimals {d['delta_decimals']:+.2f} vs {source}"
              for d in att["top_differing_heads"][:5]]
    return lines


def transplant_section(context: StudyContext) -> list[str]:
    tr, bl = load_data(context.folder, "transplant"), load_data(context.folder, "blocking")
    lines = ["## Attention transplantation (all heads of a layer)", "", *_per_layer(tr["rows"], "transplant", tr["layers"]),
             "", "Best single heads (fix):", ""]
    heads = [r for r in tr["rows"] if not r["cell_id"].endswith(".all")]
    lines += [f"- `{b['cell_id']}` mean fix rate {b['mean_success']:.2f}" for b in best_rows(heads, "fix", top=3)]
    lines += ["", "## Blocking attention to the format's own tokens (one layer, all heads; prompt and decoding)", "",
              *_per_layer(bl["rows"], "block", bl["layers"]), "", "Best single heads (fix):", ""]
    for b in best_rows([r for r in bl["rows"] if not r["cell_id"].endswith(".all")], "fix", top=3):
        lines.append(f"- `{b['cell_id']}`: " + "; ".join(f"{f}: {_r(v['success'])}" for f, v in b["per_format"].items()))
    lines += ["", f"## Head subsets in layer {tr['subset_layer']} (fix direction)", "",
              "| mode | pool | format | k | subsets | mean fix rate | share ≥ threshold |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['mode']} | {x['pool']} | {x['format']} | {x['k']} | {x['subsets']} | {x['mean_success']:.2f} | "
              f"{x['share_above_threshold']:.2f} |" for x in tr["subsets"] if x["direction"] == "fix"]
    return lines


def ablation_section(context: StudyContext) -> list[str]:
    ab = load_data(context.folder, "ablation")
    lines = ["## Head ablation", ""]
    for b in best_rows(ab["rows"], "fix", top=3) + best_rows(ab["rows"], "break", top=3):
        per = "; ".join(f"{f}: {_r(v['success'])} / floor {v['floor']['rate']:.2f}" for f, v in b["per_format"].items())
        lines.append(f"- `{b['cell_id']}`: {per}")
    n = ab["neurons"]
    lines += ["", f"## MLP neuron ablation (layer {n['layer']})", ""]
    for r in n["results"]:
        fixes = "; ".join(f"{k}: {_r(v)}" for k, v in r.items() if k.startswith("fix."))
        lines.append(f"- {r['n_neurons']} neuron(s): {fixes}; {context.settings.source_format} still correct "
                     f"{_r(r['correct_format_still_correct'])}")
    lines.append("- floors: " + "; ".join(f"{k}: {_r(v)}" for k, v in n["floors"].items()))
    return lines


def figures_section(context: StudyContext) -> list[str]:
    """Draw the figures of every analysis that ran into ``analyses/figures/`` and list them."""
    from tasks.decimal_comparison.figures import make_figures

    data: dict[str, Any] = {}
    for name in ("bug_rate", "patching", "generalisation", "attention", "transplant", "blocking", "ablation"):
        try:
            data[name] = load_data(context.folder, name)
        except FileNotFoundError:
            continue
    patch = data.get("patching")
    critical = critical_layers(patch["rows"], patch["layers"], "attention_output")[0] if patch else None
    folder = context.folder / "analyses" / "figures"
    written = make_figures(data, folder, critical_layer=critical)
    return ["## Figures", "", *[f"- `analyses/figures/{name}`" for name in written]] if written else []


SECTIONS = (bug_rate_section, patching_section, generalisation_section, attention_section, transplant_section,
            ablation_section, figures_section)
