"""Two hypotheses of how a network adds two 2-digit numbers ("58+67=" -> "125").

Both read the same inputs, the four digits (a1 a0 + b1 b0, place 1 = tens) and the prompt they
render; they differ in what they compute on the way to the answer.
"""

from causal import CausalModel

DIGITS = ["a1", "a0", "b1", "b0"]
INPUTS = dict(  # the variables both hypotheses share: the digits and the prompt
    values={**{d: range(10) for d in DIGITS}, "raw_input": None},
    parents={**{d: [] for d in DIGITS}, "raw_input": DIGITS},
    mechanisms={**{d: (lambda: 0) for d in DIGITS}, "raw_input": lambda a1, a0, b1, b0: f"{a1}{a0}+{b1}{b0}="},
)


def columns() -> CausalModel:
    """Column by column: the ones column's sum, then the tens column's sum plus the carry."""
    return CausalModel(
        variables=[*DIGITS, "raw_input", "ones_sum", "tens_sum", "raw_output"],
        values={**INPUTS["values"], "ones_sum": range(19), "tens_sum": range(20), "raw_output": None},
        parents={**INPUTS["parents"], "ones_sum": ["a0", "b0"], "tens_sum": ["a1", "b1", "ones_sum"],
                 "raw_output": ["tens_sum", "ones_sum"]},
        mechanisms={**INPUTS["mechanisms"], "ones_sum": lambda a0, b0: a0 + b0,
                    "tens_sum": lambda a1, b1, ones: a1 + b1 + ones // 10,  # ones // 10: the carry
                    "raw_output": lambda tens, ones: str(10 * tens + ones % 10)},
        id="columns",
    )


def whole_numbers() -> CausalModel:
    """Number by number: the value of each operand, then their sum."""
    return CausalModel(
        variables=[*DIGITS, "raw_input", "a", "b", "raw_output"],
        values={**INPUTS["values"], "a": range(100), "b": range(100), "raw_output": None},
        parents={**INPUTS["parents"], "a": ["a1", "a0"], "b": ["b1", "b0"], "raw_output": ["a", "b"]},
        mechanisms={**INPUTS["mechanisms"], "a": lambda tens, ones: 10 * tens + ones,
                    "b": lambda tens, ones: 10 * tens + ones, "raw_output": lambda a, b: str(a + b)},
        id="whole_numbers",
    )
