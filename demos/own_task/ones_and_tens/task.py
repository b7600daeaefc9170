"""Two-digit addition on the shipped organism: does it add column by column, or number by number?"""

from experiments.task import Task
from tasks.general_addition.task import ORGANISM

from .causal_models import columns, whole_numbers
from .positions import token_positions
from .sampler import FAMILIES, make_datasets

TASK = Task(
    name="ones_and_tens",
    description="2-digit addition: column sums (ones_sum, tens_sum) or whole operands (a, b)?",
    causal_models=lambda settings: {"columns": columns(), "whole_numbers": whole_numbers()},
    make_datasets=make_datasets,
    token_positions=token_positions,
    families=lambda settings: list(FAMILIES),
    organism=ORGANISM,
)
