"""The output tables of a part: their columns, built from rows, and the check that they hold exactly its rows. Torch-free.

Base tables hold one row per example, cells tables one row per (cell, example), both in the columns of
``OUTPUT_COLUMNS`` (cells tables also ``cell_id``). ``content_problem`` says why a table does not hold exactly a
part's examples (and cells); readers and the writer both apply it.
"""

from __future__ import annotations

from typing import Any, Iterable

import pandas as pd

OUTPUT_COLUMNS = ["example_index", "output_text", "output_token_ids", "topk_token_ids", "topk_logits"]


def rows_to_frames(base_rows: Iterable[dict[str, Any]], cell_rows: Iterable[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """Output rows as the two tables of a part file pair."""
    return {"base": pd.DataFrame(list(base_rows), columns=OUTPUT_COLUMNS),
            "cells": pd.DataFrame(list(cell_rows), columns=["cell_id", *OUTPUT_COLUMNS])}


def content_problem(kind: str, frame: pd.DataFrame, indices: list[int], cell_ids: list[str]) -> str | None:
    """Why a part's table does not hold exactly the expected rows (None when it does)."""
    columns = OUTPUT_COLUMNS if kind == "base" else ["cell_id", *OUTPUT_COLUMNS]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        return f"columns {missing} are missing"
    got = [int(i) for i in frame["example_index"]]
    if kind == "base":
        if sorted(got) != indices:
            return f"holds examples {describe_indices(got)} instead of {describe_indices(indices)}"
        return None
    expected = len(cell_ids) * len(indices)
    pairs = set(zip(frame["cell_id"].astype(str), got))
    wanted = {(c, i) for c in cell_ids for i in indices}
    if len(frame) != expected or pairs != wanted:
        stray = sorted(pairs - wanted)[:3]
        absent = sorted(wanted - pairs)[:3]
        detail = "; ".join(x for x in (f"unexpected (cell, example) e.g. {stray}" if stray else "",
                                       f"missing e.g. {absent}" if absent else "") if x)
        return (f"holds {len(frame)} rows, expected {expected} (cells x examples {describe_indices(indices)})"
                + (f": {detail}" if detail else ": duplicated rows"))
    return None


def describe_indices(indices: list[int]) -> str:
    """Example indices for a message: ``[a..b]`` for a contiguous range, else the first few."""
    if not indices:
        return "[]"
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return f"[{indices[0]}..{indices[-1]}]"
    return str(indices[:8])[:-1] + (", ...]" if len(indices) > 8 else "]")
