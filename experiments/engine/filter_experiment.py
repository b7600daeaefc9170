"""`FilterExperiment`: keep the counterfactual pairs the network gets right on every input."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from pydantic import BaseModel
from tqdm.auto import tqdm

from causal.causal_model import CausalModel
from causal.counterfactual_dataset import CounterfactualDataset, as_dataset_dict
from experiments.pipeline import LMPipeline


class FilterReport(BaseModel):
    """Per dataset: pairs kept out of total, and the network's accuracy on every input seen."""

    dataset_id: str
    total_pairs: int
    kept_pairs: int
    input_accuracy: float
    inputs_checked: int

    @property
    def kept_fraction(self) -> float:
        return self.kept_pairs / self.total_pairs if self.total_pairs else 0.0


class FilterExperiment:
    """A pair is kept only if ``checker(network output, causal_model's raw_output)`` holds on its base
    and on every counterfactual input."""

    def __init__(self, pipeline: LMPipeline, causal_model: CausalModel, checker: Callable[[str, Any], bool]):
        self.pipeline = pipeline
        self.causal_model = causal_model
        self.checker = checker

    def correct(self, settings: Sequence[dict[str, Any]], batch_size: int = 64, verbose: bool = False) -> list[bool]:
        """Is the network right on each input (greedy answer vs. the causal model's raw_output)?"""
        out: list[bool] = []
        starts = range(0, len(settings), batch_size)
        for start in tqdm(starts, desc="checking inputs", disable=not verbose):
            chunk = list(settings[start : start + batch_size])
            rows = self.pipeline.output_rows(self.pipeline.generate(chunk), range(len(chunk)))
            for setting, text in zip(chunk, (row["output_text"] for row in rows)):
                expected = self.causal_model.run_forward(setting)["raw_output"]
                out.append(bool(self.checker(text, expected)))
        return out

    def filter(
        self,
        datasets: CounterfactualDataset | Sequence[CounterfactualDataset] | Mapping[str, CounterfactualDataset],
        batch_size: int = 64,
        verbose: bool = True,
    ) -> tuple[dict[str, CounterfactualDataset], list[FilterReport]]:
        """Filtered datasets (same ids; those with no surviving pair left out) and one report per dataset."""
        items = list(as_dataset_dict(datasets).values())
        kept: dict[str, CounterfactualDataset] = {}
        reports = []
        for dataset in items:
            examples = [dataset[i] for i in range(len(dataset))]
            # each distinct input is generated once; a pair refers to its inputs by their index
            keys: dict[str, int] = {}
            settings: list[dict[str, Any]] = []
            pair_inputs: list[list[int]] = []
            for ex in examples:
                refs = []
                for s in [ex["input"], *ex["counterfactual_inputs"]]:
                    key = repr(sorted(s.items()))
                    if key not in keys:
                        keys[key] = len(settings)
                        settings.append(s)
                    refs.append(keys[key])
                pair_inputs.append(refs)
            ok = self.correct(settings, batch_size, verbose)
            keep = [all(ok[i] for i in refs) for refs in pair_inputs]
            selected = [ex for ex, k in zip(examples, keep) if k]
            if selected:  # a dataset with no surviving pair is left out (its report says so)
                kept[dataset.id] = CounterfactualDataset.from_dict(
                    {"input": [ex["input"] for ex in selected],
                     "counterfactual_inputs": [ex["counterfactual_inputs"] for ex in selected]},
                    id=dataset.id,
                )
            reports.append(FilterReport(
                dataset_id=dataset.id, total_pairs=len(examples), kept_pairs=len(selected),
                input_accuracy=sum(ok) / len(ok) if ok else 0.0, inputs_checked=len(ok),
            ))
        return kept, reports
