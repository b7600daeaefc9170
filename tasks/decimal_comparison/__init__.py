"""Decimal comparison task ("Which is larger, 9.8 or 9.11?"): numeric vs whole-number-fraction
hypotheses, counterfactual samplers and an answer checker. Pure Python."""
