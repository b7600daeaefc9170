"""Causal abstraction, torch-free side: causal models, counterfactual datasets, raw results, scoring.

Nothing in this package imports torch (or transformers / pyvene), so analyses can run from a
results folder alone.
"""

from causal.causal_model import CausalModel, MechanismError, StructuredValues
from causal.controls import permuted_labels, shuffled_source_labels, standard_controls
from causal.counterfactual_dataset import CounterfactualDataset
from causal.interchange_scores import InterchangeScores, compute_interchange_scores, score_labels, wilson_interval
from causal.results import (
    CellSpec,
    DatasetRecord,
    RawResults,
    RawResultsWriter,
    ResultsError,
    ResultsManifest,
    UnitAddress,
)
from causal.verdicts import Verdicts, VerdictRule, compare_hypotheses, verdicts_from_per_example

__all__ = [
    "CausalModel",
    "MechanismError",
    "StructuredValues",
    "score_labels",
    "permuted_labels",
    "shuffled_source_labels",
    "standard_controls",
    "Verdicts",
    "VerdictRule",
    "verdicts_from_per_example",
    "compare_hypotheses",
    "CounterfactualDataset",
    "compute_interchange_scores",
    "InterchangeScores",
    "wilson_interval",
    "RawResults",
    "RawResultsWriter",
    "ResultsManifest",
    "CellSpec",
    "UnitAddress",
    "DatasetRecord",
    "ResultsError",
]
