"""The network side: the language-model pipeline, the backends that reach into a network, the intervention engine,
featurizers, attribution patching, the analysis toolkit and the study runner.

Modules that moved into folders keep their old import path for one release: importing it warns
(``DeprecationWarning``) and gives the module at its new path (MIGRATION_GUIDE.md lists them).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

#: old import path -> new import path (deprecated aliases, removed in the next release)
MOVED: dict[str, str] = {
    "experiments.backend": "experiments.backends",
    "experiments.hooks_backend": "experiments.backends.hooks_backend",
    "experiments.pyvene_backend": "experiments.backends.pyvene_backend",
    "experiments.architectures": "experiments.backends.architectures",
    "experiments.transformers_adapter": "experiments.backends.transformers_adapter",
    "experiments.attention_control": "experiments.backends.attention_control",
    "experiments.suffix_reuse": "experiments.backends.suffix_reuse",
    "experiments.sites": "experiments.backends.sites",
    "experiments.model_units": "experiments.engine.model_units",
    "experiments.intervention_engine": "experiments.engine.intervention_engine",
    "experiments.intervention_experiment": "experiments.engine.intervention_experiment",
    "experiments.filter_experiment": "experiments.engine.filter_experiment",
    "experiments.fleet": "experiments.engine.fleet",
    "experiments.learned_featurizers": "experiments.featurizers.learned",
    "experiments.featurizer_store": "experiments.featurizers.store",
    "experiments.featurizer_training": "experiments.featurizers.training",
    "experiments.residual_das": "experiments.featurizers.das",
    "experiments.suffix_training": "experiments.featurizers.suffix_training",
    "experiments.attribution_units": "experiments.attribution.units",
    "experiments.attribution_screen": "experiments.attribution.screen",
    "experiments.visualizations": "experiments.analysis.visualizations",
    "experiments.latent_reasoning": "tasks.ct_positions.latent_reasoning",
    "experiments.codi": "tasks.ct_positions.codi",
    "experiments.error_taxonomy": "tasks.ct_positions.error_taxonomy",
    "experiments.problem_sensitivity": "tasks.ct_positions.problem_sensitivity",
}


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new path (one module object under both names)."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        target = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {target}; the old path is removed in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(target)
        self.target_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.target_spec  # the import system set the alias's spec; the module keeps its own


class _MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, _Alias()) if name in MOVED else None


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
