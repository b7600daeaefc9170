"""JSON-safe values of pandas tables: numpy scalars become Python ones, NaN / NA become None. Torch-free."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def json_scalar(value: Any) -> Any:
    """JSON-safe scalar: numpy -> python, NaN/NA -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def json_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """One JSON-safe dict per row of ``frame``."""
    return [{k: json_scalar(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
