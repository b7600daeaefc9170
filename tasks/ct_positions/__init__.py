"""Continuous-thought positions task: which of six CT slots carry which intermediate result of a
multi-step arithmetic word problem. Causal models, counterfactual samplers and a checker; pure
Python."""
