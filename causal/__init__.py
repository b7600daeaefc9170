"""Causal abstraction, torch-free side: causal models, counterfactual datasets, raw results, scoring.

Nothing in this package imports torch (or transformers / pyvene), so analyses can run from a
results folder alone.
"""

from causal.causal_model import CausalModel
from causal.counterfactual_dataset import CounterfactualDataset
from causal.interchange_scores import InterchangeScores, compute_interchange_scores, wilson_interval
from causal.raw_results import (
    CellSpec,
    DatasetRecord,
    RawResults,
    RawResultsWriter,
    ResultsError,
    ResultsManifest,
    UnitAddress,
)

__all__ = [
    "CausalModel",
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
