"""Counterfactual pairs: {"input": base setting, "counterfactual_inputs": [source setting]}."""

import random

from causal import CounterfactualDataset

from .causal_models import DIGITS, columns

MODEL = columns()  # either hypothesis samples the same inputs: the four digits and the prompt


def random_pair(rng: random.Random) -> dict:
    """A random base and a random source that differs from it in every digit (so that a patch moving one digit
    can never pass for one moving a whole number)."""
    base = MODEL.sample_input(rng=rng)
    source = MODEL.sample_input(filter=lambda s: all(s[d] != base[d] for d in DIGITS), rng=rng)
    return {"input": base, "counterfactual_inputs": [source]}


def carries(setting: dict) -> bool:
    return setting["a0"] + setting["b0"] >= 10


FAMILIES = {  # family -> which random pairs it keeps
    "random": None,
    "carry_differs": lambda pair: carries(pair["input"]) != carries(pair["counterfactual_inputs"][0]),
}


def make_datasets(settings, families: list[str], size: int, seed: int) -> dict[str, CounterfactualDataset]:
    """``size`` pairs per family; each family has its own seeded generator, so adding one changes no other."""
    datasets = {}
    for family in families:
        rng = random.Random(f"{seed}-{family}")
        datasets[family] = CounterfactualDataset.from_sampler(size, lambda: random_pair(rng), FAMILIES[family], id=family)
    return datasets
