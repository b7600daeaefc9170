"""Screen, then verify: estimate every cell's interchange effect at once (`experiments.attribution.units`), run
exact interchange on the top of the ranking plus a seeded random sample of the rest, and judge the verified cells
with the project's verdict rule.

Estimates are kept apart from exact results. `AttributionEstimates` is its own typed record, written as one JSON
file whose identity says ``"estimate": true`` and names the causal model and target variables that defined the
metric, the network (`model_fingerprint`) and the datasets (fingerprints); it refuses to be written inside a
results folder, and a results folder refuses to be created where such a file lies (`RawResultsWriter` refuses
files of unknown origin). Exact interchange runs through the ordinary engine into an ordinary results folder.

Ranking (``ScreenConfig.score``), each a mean over the pairs whose labels differ. The verdict asks whether a patch
makes the output *become* the counterfactual label; the metric's largest moves come from patches that destroy the
base answer, and where the answer flips the first-order term is far too small (the log-probability saturates), so
the scores differ in what they reward:

- ``prob`` (default): the first-order change of p(cf label), ``p(cf) * d log p(cf)``. It weights each pair by how
  close the cf label already is, so pairs near their decision count and pairs far from it do not;
- ``toward``: the first-order change of log p(cf label) alone (the cf rows' term). With a confident base answer
  the gradient of log p(base label) vanishes, so this is nearly ``signed``;
- ``signed``: the mean estimate of the metric; ``abs``: the mean ``|estimate|`` (a large move either way);
- ``flip``: the first-order "would flip" count, the share of pairs where ``metric_base + estimate`` crosses 0
  (cf label over base label) minus those where it crosses back; ties are broken by ``soft_flip``, the mean change
  of ``sigmoid(metric)`` (the cf label's probability between the two labels) at the first-order metric;
- ``informative``: ``signed`` on the pairs whose unpatched greedy answer (teacher-forced argmax) is not the cf
  label. This restriction is for ranking only; the verdicts keep every pair;
- ``graddrop``: the mean AtP* GradDrop score (exposes cells whose paths cancel; one more pass per layer).

The README compares them against the verdicts of full exact sweeps (``scripts/validate_attribution.py --screen``).

What the verdicts control. The correction (Holm by default) runs over the verified cells only; cells never
verified are not tested. Screening with the same pairs that the exact test then uses makes the selection depend
on the data; pass ``verify_datasets`` (fresh pairs, e.g. another seed) to keep the tests independent of it.
The random sample estimates what the screen misses: located cells in it are cells the screen ranked low.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats
from tqdm.auto import tqdm

from causal.counterfactual_dataset import CounterfactualDataset, as_dataset_dict
from causal.interchange_scores import compute_interchange_scores
from causal.json_records import json_records
from causal.results import MANIFEST_NAME, CellSpec, DatasetRecord, atomic_write_json
from causal.verdicts import POOLED, VerdictRule, clopper_pearson
from experiments.attribution.units import AttributionCell, AttributionResult, UnitAttribution
from experiments.engine.intervention_experiment import ExperimentConfig, InterventionExperiment, model_fingerprint

ESTIMATES_KIND = "attribution_estimates"
METHOD = ("AtP: (a_source - a_base) . dM/da at the base run; attention-pattern cells: AtP* QK fix (exact softmax "
          "change times dM/dA)")
METRIC = "log p(cf label) - log p(base label), teacher-forced, every answer token scored"
PATH_METHOD = ("path gradients: (a_source - a_base) . mean over {k} midpoints alpha of dM/da at a_base + alpha (a_source - "
               "a_base), every cell of a site moved together; attention-pattern cells and GradDrop: as plain AtP*")
Score = Literal["abs", "signed", "toward", "prob", "flip", "soft_flip", "informative", "graddrop"]
SCORES: tuple[str, ...] = ("abs", "signed", "toward", "prob", "flip", "soft_flip", "informative", "graddrop")
#: per-result arrays written beside the estimates when present
OPTIONAL_ARRAYS = ("linearised", "graddrop", "toward", "logp_cf", "logp_base", "greedy_cf", "greedy_base")
Datasets = CounterfactualDataset | Sequence[CounterfactualDataset] | Mapping[str, CounterfactualDataset]


class EstimatesIdentity(BaseModel):
    """What a set of estimates is: marked ``estimate: true``; the causal model and variables that defined the
    metric; the network, datasets and cells."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    estimate: Literal[True] = True
    kind: Literal["attribution_estimates"] = ESTIMATES_KIND
    method: str = METHOD
    metric: str = METRIC
    causal_model_id: str
    target_variables: list[str]
    counterfactual_index: int = 0
    path_steps: int = Field(0, ge=0)  # > 0: activation cells' gradients averaged along the path (units.py)
    model: dict[str, Any]
    datasets: list[DatasetRecord]
    cells: list[CellSpec]


@dataclass
class AttributionEstimates:
    """Estimates of every cell on every dataset: ``results[dataset_id]`` (C, N) arrays, one `AttributionResult`
    each (``exact`` never set here)."""

    identity: EstimatesIdentity
    results: dict[str, AttributionResult]

    @property
    def cell_ids(self) -> list[str]:
        return [c.cell_id for c in self.identity.cells]

    def pooled(self, what: str = "estimates") -> np.ndarray:
        """(C, N_total) ``what`` ("estimates", "linearised", "graddrop_score") of the informative pairs of every
        dataset, side by side."""
        return np.concatenate([np.asarray(getattr(r, what))[:, r.informative] for r in self.results.values()], 1)

    def scores(self, score: Score = "prob") -> np.ndarray:
        """(C,) the ranking score of every cell, a mean over the pairs whose labels differ (see the module
        docstring for what each score asks)."""
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
        if score == "flip":  # ties (equal counts) broken by the soft count, never reordering the counts
            counts, soft = self._mean("flip_count"), self._mean("soft_flip")
            n = max(1, sum(int(r.informative.sum()) for r in self.results.values()))
            order = stats.rankdata(soft) / (len(soft) + 1)  # in (0, 1)
            return counts + order / (2 * n)
        return self._mean(score)

    def _mean(self, score: str) -> np.ndarray:
        parts = [pair_scores(r, score) for r in self.results.values()]
        values = np.concatenate([v[:, keep] for v, keep in parts], 1)
        return values.mean(1) if values.shape[1] else np.zeros(values.shape[0])

    def to_json(self) -> dict[str, Any]:
        def arrays(r: AttributionResult) -> dict[str, Any]:
            out: dict[str, Any] = {"estimates": r.estimates.tolist(), "metric_base": r.metric_base.tolist(),
                                   "informative": r.informative.astype(bool).tolist()}
            for name in OPTIONAL_ARRAYS:
                if getattr(r, name) is not None:
                    out[name] = np.asarray(getattr(r, name)).tolist()
            return out

        return {**self.identity.model_dump(mode="json"), "results": {k: arrays(r) for k, r in self.results.items()}}

    def save(self, path: str | Path) -> Path:
        """Write the JSON file ``path``; refused inside a results folder (one holding a results manifest)."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            raise ValueError(f"estimates are written to a .json file, not {path}")
        if (path.parent / MANIFEST_NAME).exists():
            raise ValueError(f"{path.parent} is a results folder (it holds {MANIFEST_NAME}): estimates are never "
                             "written beside exact interchange results; choose another folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttributionEstimates":
        """Read a file written by `save`; anything not marked ``estimate: true`` is refused."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("estimate") is not True or data.get("kind") != ESTIMATES_KIND:
            raise ValueError(f"{path} holds no attribution estimates (no 'estimate': true / kind {ESTIMATES_KIND!r})")
        results_data = data.pop("results")
        identity = EstimatesIdentity.model_validate(data)
        ids = [c.cell_id for c in identity.cells]
        results = {}
        for dataset_id, r in results_data.items():
            optional = {k: np.asarray(r[k], dtype=bool if k.startswith("greedy") else float)
                        for k in OPTIONAL_ARRAYS if k in r}
            results[dataset_id] = AttributionResult(ids, np.asarray(r["estimates"]), np.asarray(r["metric_base"]),
                                                    np.asarray(r["informative"], dtype=bool), **optional)
        return cls(identity, results)


def pair_scores(result: AttributionResult, score: str) -> tuple[np.ndarray, np.ndarray]:
    """(C, N) per-pair values of a ranking ``score`` and (N,) the pairs it is averaged over (labels differ; for
    ``informative`` also: the unpatched greedy answer is not the cf label). ``flip`` ranks by ``flip_count``
    (the first-order count) with ties broken by ``soft_flip``; see `AttributionEstimates.scores`."""
    keep = np.asarray(result.informative, dtype=bool)

    def need(name: str) -> np.ndarray:
        value = getattr(result, name)
        if value is None:
            raise ValueError(f"score {score!r} needs {name!r}, which these estimates do not hold (estimated before "
                             "it was recorded): estimate again")
        return np.asarray(value)

    est = np.asarray(result.estimates)
    if score == "abs":
        return np.abs(est), keep
    if score == "signed":
        return est, keep
    if score == "graddrop":
        return result.graddrop_score, keep
    if score == "toward":
        return need("toward"), keep
    if score == "prob":  # first-order change of p(cf label): p * d log p
        return np.exp(need("logp_cf"))[None] * need("toward"), keep
    if score == "informative":
        return est, keep & ~need("greedy_cf").astype(bool)
    base = np.asarray(result.metric_base)[None]
    after = base + est  # first-order metric after the patch: > 0 where the cf label would beat the base label
    if score == "flip_count":
        return (after > 0).astype(float) - (base > 0).astype(float), keep
    if score == "soft_flip":
        return _sigmoid(after) - _sigmoid(base), keep
    raise ValueError(f"unknown score {score!r}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float)))


def _pairs_and_labels(dataset: CounterfactualDataset, causal_model: Any, target_variables: list[str],
                      counterfactual_index: int) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    examples = dataset.to_list()
    bases = [e["input"] for e in examples]
    sources = [e["counterfactual_inputs"][counterfactual_index] for e in examples]
    return (bases, sources, causal_model.label_data(dataset),
            causal_model.label_counterfactual_data(dataset, target_variables, counterfactual_index))



def estimate_study(attribution: UnitAttribution, causal_model: Any, datasets: Datasets, target_variables: list[str],
                   counterfactual_index: int = 0, graddrop: bool = False, progress: bool = False,
                   pairs_per_pass: int = 256, path_steps: int = 0) -> AttributionEstimates:
    """Estimates of every cell of ``attribution`` on every dataset, the metric defined by ``causal_model``'s labels
    with ``target_variables`` interchanged. The pairs of all datasets are pooled and estimated ``pairs_per_pass``
    at a time (one source pass and one forward/backward each), then split by dataset again. ``path_steps``: see
    `UnitAttribution.estimate_prepared` (part of the estimates' identity)."""
    given = as_dataset_dict(datasets)
    pooled: list[list[Any]] = [[], [], [], []]
    sizes = []
    for dataset in given.values():
        for column, values in zip(pooled, _pairs_and_labels(dataset, causal_model, target_variables,
                                                            counterfactual_index)):
            column.extend(values)
        sizes.append(len(dataset))
    step = max(1, pairs_per_pass)
    chunks = range(0, len(pooled[0]), step)
    parts = [attribution.estimate(*(column[i : i + step] for column in pooled), graddrop=graddrop,
                                  path_steps=path_steps)
             for i in tqdm(chunks, desc="estimates", disable=not progress, leave=False)]
    joined = AttributionResult.concat(parts)
    bounds = np.cumsum([0, *sizes])
    results = {dataset_id: joined.take(slice(int(a), int(b)))
               for dataset_id, a, b in zip(given, bounds[:-1], bounds[1:])}
    identity = EstimatesIdentity(
        causal_model_id=str(causal_model.id), target_variables=list(target_variables),
        counterfactual_index=counterfactual_index, path_steps=path_steps, model=model_fingerprint(attribution.pipeline),
        method=PATH_METHOD.format(k=path_steps) if path_steps else METHOD,
        datasets=[DatasetRecord(dataset_id=d.id, fingerprint=d.fingerprint(), size=len(d)) for d in given.values()],
        cells=[c.engine_cell().spec for c in attribution.cells])
    return AttributionEstimates(identity, results)


class ScreenConfig(BaseModel):
    """How many cells to verify: the top ``top_fraction`` of the ranking by ``score`` (at least one) plus a seeded
    random sample of ``random_fraction`` of the rest (rounded up; 0 for none). ``exact_metric``: also compute the
    verified cells' exact effect on the metric (teacher-forced; one more patched pass of every verified cell,
    for the estimate-vs-exact comparison); the verdicts never need it. ``path_steps``: estimate with gradients
    averaged along the path from base to source (`UnitAttribution.estimate_prepared`; 0: plain AtP)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_fraction: float = Field(0.1, gt=0, le=1)
    random_fraction: float = Field(0.05, ge=0, le=1)
    seed: int = 0
    score: Score = "prob"
    exact_metric: bool = False
    path_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _graddrop_is_plain(self) -> "ScreenConfig":
        if self.score == "graddrop" and self.path_steps:
            raise ValueError("score 'graddrop' ranks by the plain estimate's GradDrop: path_steps must be 0 with it")
        return self

    def select(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(top, sample): indices of the top cells (best first) and of the random sample of the rest (sorted)."""
        order = np.argsort(-np.asarray(scores), kind="stable")
        n_top = max(1, math.ceil(self.top_fraction * len(order)))
        top, rest = order[:n_top], order[n_top:]
        k = min(len(rest), math.ceil(self.random_fraction * len(rest)))
        sample = np.sort(np.random.default_rng(self.seed).choice(rest, size=k, replace=False)) if k else rest[:0]
        return top, sample


@dataclass
class ScreenResult:
    """A screened and verified study.

    ``table``: one row per cell (ranking order): ``cell_id``, ``kind``, ``rank``, ``score``, ``chosen`` ("top",
    "random" or "" for unverified), ``estimate_mean`` (mean estimate over informative pairs), ``exact_mean`` (the
    exact effect on the same metric; NaN unless verified with ``exact_metric``) and, for verified cells, the
    verdict columns of `causal.verdicts` (pooled over the families): ``grade``, ``effect`` (IIA - floor), ``iia``,
    ``floor``, ``gained``, ``lost``, ``p_adjusted``. ``located_top`` / ``located_random``: located (full or
    partial) cells in the top and in the random sample; the latter are cells the screen missed. ``seconds``: wall
    time of each stage (``estimate``, ``exact_metric`` when computed, ``interchange``, ``verdicts``). ``location``: the
    verified cell the verdicts locate the variable at (best grade, then largest effect), None when none is
    located."""

    identity: EstimatesIdentity
    config: ScreenConfig
    rule: VerdictRule
    table: pd.DataFrame
    results_dir: str
    located_top: list[str] = field(default_factory=list)
    located_random: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_top(self) -> int:
        return int((self.table["chosen"] == "top").sum())

    @property
    def n_random(self) -> int:
        return int((self.table["chosen"] == "random").sum())

    @property
    def missed_rate(self) -> tuple[float, float]:
        """Share of the random sample located, and its exact (Clopper-Pearson) upper bound at the rule's
        confidence: how often a cell below the top carries the variable."""
        k, n = len(self.located_random), self.n_random
        if n == 0:
            return math.nan, math.nan
        _, high = clopper_pearson(np.array([k]), np.array([n]), self.rule.confidence)
        return k / n, float(high[0])

    @property
    def location(self) -> str | None:
        located = self.table[self.table["grade"].isin(["full", "partial"])] if "grade" in self.table else []
        if len(located) == 0:
            return None
        order = located.assign(_g=located["grade"].map({"full": 0, "partial": 1}), _e=-located["effect"])
        return str(order.sort_values(["_g", "_e"], kind="stable")["cell_id"].iloc[0])

    @property
    def spearman(self) -> float:
        """Spearman correlation of the mean estimate and the mean exact effect over the verified cells (NaN
        without ``exact_metric``)."""
        verified = self.table[self.table["chosen"] != ""]
        if len(verified) < 3 or verified["exact_mean"].isna().any():
            return math.nan
        return float(stats.spearmanr(verified["estimate_mean"], verified["exact_mean"]).statistic)

    def summary(self) -> str:
        rate, high = self.missed_rate
        unverified = int((self.table["chosen"] == "").sum())
        lines = [f"screen of {len(self.table)} cells for {'+'.join(self.identity.target_variables)} "
                 f"({self.identity.causal_model_id}) by {self.config.score} estimate: verified the top {self.n_top} "
                 f"and {self.n_random} random others (seed {self.config.seed})",
                 f"located in the top: {', '.join(self.located_top) or 'none'}",
                 f"located in the random sample (missed by the screen): {', '.join(self.located_random) or 'none'}"]
        if self.n_random:
            lines.append(f"missed share {rate:.2f} (upper {self.rule.confidence:.0%} bound {high:.2f}) of "
                         f"{unverified} unverified cells")
        if not math.isnan(self.spearman):
            lines.append(f"Spearman(estimate, exact) over verified cells: {self.spearman:.2f}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe record: the estimates' identity (``estimate: true`` there), the screen, the rule, the table
        (exact columns from exact runs, estimate columns from the estimates), the exact results folder."""
        return {"kind": "attribution_screen", "estimates_identity": self.identity.model_dump(mode="json"),
                "config": self.config.model_dump(), "rule": self.rule.model_dump(), "rule_text": self.rule.describe(),
                "results_dir": self.results_dir, "located_top": self.located_top,
                "located_random": self.located_random, "seconds": self.seconds, "table": json_records(self.table)}


def screen_and_verify(
    attribution: UnitAttribution,
    causal_model: Any,
    datasets: Datasets,
    target_variables: list[str],
    checker: Callable[[str, Any], bool],
    config: ScreenConfig | None = None,
    results_dir: str | Path | None = None,
    restart: bool = False,
    rule: VerdictRule | None = None,
    estimates: AttributionEstimates | None = None,
    verify_datasets: Datasets | None = None,
    batch_size: int = 32,
    progress: bool = False,
    pack_sites: bool = True,
) -> ScreenResult:
    """Rank every cell of ``attribution`` by its estimate on ``datasets`` (or take ``estimates``), then run exact
    interchange on the top fraction plus a random sample (``config``) over ``verify_datasets`` (default: the same
    datasets): the exact effect on the metric and the engine's interchange (greedy answers, written to
    ``results_dir``; a temporary folder when None) scored by ``checker`` and judged by ``rule`` (Holm over the
    verified cells by default). ``pack_sites``: the verified cells of different sites share forwards
    (`experiments.engine.intervention_engine`; needs the hooks backend)."""
    config = config or ScreenConfig()
    rule = rule or VerdictRule()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    if estimates is None:
        estimates = estimate_study(attribution, causal_model, datasets, target_variables,
                                   graddrop=config.score == "graddrop", progress=progress,
                                   path_steps=config.path_steps)
    else:
        fingerprints = {d.id: d.fingerprint() for d in as_dataset_dict(datasets).values()}
        if estimates.identity.model != model_fingerprint(attribution.pipeline) or \
                {d.dataset_id: d.fingerprint for d in estimates.identity.datasets} != fingerprints:
            raise ValueError("the estimates were computed on another network or other datasets than this screen's")
        if estimates.identity.path_steps != config.path_steps:
            raise ValueError(f"the estimates used path_steps={estimates.identity.path_steps}, this screen's config "
                             f"says {config.path_steps}")
    seconds["estimate"] = time.perf_counter() - clock
    if estimates.cell_ids != [c.cell_id for c in attribution.cells] or \
            estimates.identity.target_variables != list(target_variables):
        raise ValueError("the estimates are of other cells or another variable than this screen")
    scores = estimates.scores(config.score)
    top, sample = config.select(scores)
    chosen = {int(k): "top" for k in top} | {int(k): "random" for k in sample}
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(len(order), dtype=int)
    rank[order] = np.arange(len(order))
    verified = sorted(chosen, key=lambda k: rank[k])
    cells = [attribution.cells[k] for k in verified]

    index = estimates.identity.counterfactual_index
    check = as_dataset_dict(verify_datasets if verify_datasets is not None else datasets)
    exact_of: dict[int, float] = {}
    if config.exact_metric:
        clock = time.perf_counter()
        exact_sum, exact_n = np.zeros(len(cells)), 0
        for dataset in tqdm(check.values(), desc="exact effects", disable=not progress, leave=False):
            pairs = attribution.prepare(*_pairs_and_labels(dataset, causal_model, target_variables, index))
            effects = attribution.exact_prepared(pairs, attribution.base_metric(pairs), cells)
            exact_sum += effects[:, pairs.informative].sum(1)
            exact_n += int(pairs.informative.sum())
        exact_of = dict(zip(verified, exact_sum / max(1, exact_n)))
        seconds["exact_metric"] = time.perf_counter() - clock

    folder = Path(results_dir) if results_dir is not None else Path(tempfile.mkdtemp(prefix="attribution-screen-"))
    name = "+".join(target_variables)
    experiment = InterventionExperiment(attribution.pipeline, [c.engine_cell() for c in cells],
                                        ExperimentConfig(id=f"screen-{name}", batch_size=batch_size,
                                                         max_rows_per_forward=attribution.max_rows_per_forward,
                                                         counterfactual_index=index, pack_sites=pack_sites))
    clock = time.perf_counter()
    raw = experiment.perform_interventions(check, results_dir=folder, verbose=progress, restart=restart)
    seconds["interchange"] = time.perf_counter() - clock
    clock = time.perf_counter()
    scored = compute_interchange_scores(raw, causal_model, check, [list(target_variables)], checker)
    tests = scored.verdicts(rule).tests
    tests = tests[tests["scope"] == POOLED].set_index("cell_id")
    seconds["verdicts"] = time.perf_counter() - clock

    pooled = estimates.pooled()
    estimate_mean = pooled.mean(1) if pooled.shape[1] else np.zeros(len(scores))
    rows = []
    for position, k in enumerate(order):
        cell = attribution.cells[k]
        row: dict[str, Any] = {"cell_id": cell.cell_id, "kind": cell.kind, "rank": position, "score": float(scores[k]),
                               "chosen": chosen.get(int(k), ""), "estimate_mean": float(estimate_mean[k]),
                               "exact_mean": float(exact_of.get(int(k), math.nan))}
        if cell.cell_id in tests.index:
            t = tests.loc[cell.cell_id]
            row.update({c: t[c] for c in ("grade", "effect", "iia", "floor", "gained", "lost", "p_adjusted")})
        rows.append(row)
    table = pd.DataFrame(rows)
    located = table[table["grade"].isin(["full", "partial"])] if "grade" in table else table[:0]
    return ScreenResult(estimates.identity, config, rule, table, str(folder),
                        located[located["chosen"] == "top"]["cell_id"].tolist(),
                        located[located["chosen"] == "random"]["cell_id"].tolist(), seconds)
