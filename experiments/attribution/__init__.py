"""Attribution patching: every cell's interchange effect estimated from two forward passes and one backward,
checked against exact patching.

- `residual`: residual-stream cells (`ResidualAttribution`, `ResidualCell`);
- `units`: every unit kind (residual, attention, MLP, head, attention pattern) with the AtP* corrections;
- `screen`: rank every cell, then verify the top with the engine (`screen_and_verify`).
"""

from experiments.attribution.residual import (AttributionCell, AttributionResult, ResidualAttribution, ResidualCell,
                                              TeacherForcedMetric, UnitAttribution)

__all__ = ["AttributionCell", "AttributionResult", "ResidualAttribution", "ResidualCell", "TeacherForcedMetric",
           "UnitAttribution"]
