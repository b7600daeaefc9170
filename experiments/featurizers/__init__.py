"""Featurizers: the basis in which a unit's activation is interchanged.

- `base`: the contract (``featurize(x) -> (features, error)``, ``inverse(features, error) -> x``, exact), the
  identity, linear maps and SAE latents;
- `learned`: DAS (orthogonal or low-rank subspaces), Boundless DAS, DBM masks, PCA, and the one training loop;
- `training`: `train_featurizer` with its held-out verdict and controls; `das`: the units it trains at and the
  trainer; `suffix_training`: training through the layers above a residual unit, or the full forward;
- `store`: saving and loading (safetensors + a JSON record), public SAE checkpoints.
"""

from experiments.featurizers.base import Featurizer, IdentityFeaturizer, LinearFeaturizer, SAEFeaturizer, tensors_sha256

__all__ = ["Featurizer", "IdentityFeaturizer", "LinearFeaturizer", "SAEFeaturizer", "tensors_sha256"]
