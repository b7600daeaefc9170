"""Deprecated: the results format moved to the package ``causal.results``; this module re-exports its names.

Import from ``causal.results`` instead (see MIGRATION_GUIDE.md for where each name lives). This module will be
removed in the next release. Patching its names (e.g. ``fcntl`` for the lock) no longer reaches the code that
uses them: patch the module that holds them (``causal.results.lock.fcntl``).
"""

from __future__ import annotations

import warnings

from causal.results import *  # noqa: F401,F403  (every public name of the old module)
from causal.results import __all__ as _results_all

# the old module's helpers under their old names (now public in their modules)
from causal.results.atomic import TEMP_FILE_PATTERN as _TMP_NAME  # noqa: F401
from causal.results.atomic import parse_parquet as _parse_parquet  # noqa: F401
from causal.results.layout import relative_path as _rel  # noqa: F401
from causal.results.tables import content_problem as _content_problem  # noqa: F401
from causal.results.tables import describe_indices as _span  # noqa: F401
from causal.results.tables import rows_to_frames as _frames  # noqa: F401

__all__ = list(_results_all)

warnings.warn(
    "causal.raw_results moved to causal.results; import from causal.results instead "
    "(causal.raw_results will be removed in the next release)",
    DeprecationWarning,
    stacklevel=2,
)
