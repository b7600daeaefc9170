"""How often the location rule locates a null: simulated studies in which patching changes nothing.

    .venv/bin/python scripts/simulate_verdicts.py [--studies 1000] [--seed 0]

Each study has 4 variables x 8 cells x 60 pairs (per family); per cell the patched and unpatched outputs match
the label independently at the same rate. Prints, per correction, the share of studies with any location (the
family-wise false-location rate, to compare with alpha) and its exact 95% CI, for the pooled verdicts of one
family and for the per-family verdicts of five.
"""

from __future__ import annotations

import argparse

from scipy import stats

from causal.verdicts import VerdictRule, simulate_null_studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    for correction in ("holm", "bh"):
        rule = VerdictRule(alpha=args.alpha, correction=correction)
        for scope, families in (("pooled", 1), ("families", 5)):
            rate = simulate_null_studies(args.studies, rule, seed=args.seed, progress=True, n_families=families,
                                         scope=scope)
            ci = stats.binomtest(round(rate * args.studies), args.studies).proportion_ci(method="exact")
            print(f"{correction}, {scope} verdicts ({families} families): {rate:.3f} of {args.studies} null studies "
                  f"had a location (95% CI [{ci.low:.3f}, {ci.high:.3f}]; alpha = {args.alpha})")


if __name__ == "__main__":
    main()
