"""Saved featurizers: a folder with ``featurizer.safetensors`` (the defining tensors) and ``featurizer.json``
(what made it: method, unit, k, seed, data fingerprint, and the tensors' sha256).

Loading checks the sha256 of what it read against the record, so a damaged or swapped file stops with one
line instead of producing results under a false identity. The sha256 is the featurizer's
``weights_sha256()``, the same value the engine puts in a cell's identity, so raw results of two different
featurizers never share a cell. Public SAE checkpoints load with `load_sae` (safetensors, common layouts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from experiments.featurizers import Featurizer, LinearFeaturizer, SAEFeaturizer

TENSORS_FILE = "featurizer.safetensors"
RECORD_FILE = "featurizer.json"
#: Featurizer classes a saved folder can name (the class name is stored in the record).
SAVABLE: dict[str, type[Featurizer]] = {"LinearFeaturizer": LinearFeaturizer, "SAEFeaturizer": SAEFeaturizer}


class FeaturizerRecord(BaseModel):
    """What made a saved featurizer. ``unit`` names the cell it was trained at (e.g. ``L1@digit_1_0``) and
    ``component`` what it acts on there (``block_output``, ``attention_output``, ``mlp_output``,
    ``head_attention_value_output``);
    ``data_fingerprint`` is the sha256 of the training pairs and labels; ``extra`` holds method settings."""

    model_config = ConfigDict(extra="forbid")

    featurizer_class: str
    id: str
    sha256: str
    method: str = ""
    unit: str = ""
    component: str = "block_output"
    k: int | None = None
    seed: int | None = None
    data_fingerprint: str = ""
    model_sha256: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


class FeaturizerLoadError(ValueError):
    """A saved featurizer folder that cannot be used (missing, unknown class, damaged)."""


def save_featurizer(featurizer: Featurizer, folder: str | Path, **record: Any) -> FeaturizerRecord:
    """Write ``featurizer`` to ``folder`` (created) with its record; returns the record written."""
    name = type(featurizer).__name__
    if name not in SAVABLE:
        raise ValueError(f"cannot save a {name}: savable featurizers are {sorted(SAVABLE)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in featurizer.tensors().items()}
    full = FeaturizerRecord(featurizer_class=name, id=featurizer.id, sha256=featurizer.weights_sha256(), **record)
    save_file(tensors, str(folder / TENSORS_FILE))
    (folder / RECORD_FILE).write_text(json.dumps(full.model_dump(), indent=2, sort_keys=True) + "\n")
    return full


def load_featurizer(folder: str | Path) -> tuple[Featurizer, FeaturizerRecord]:
    """The featurizer saved in ``folder`` and its record; the tensors' sha256 must match the record."""
    folder = Path(folder)
    if not (folder / RECORD_FILE).is_file() or not (folder / TENSORS_FILE).is_file():
        raise FeaturizerLoadError(f"{folder}: not a saved featurizer (needs {RECORD_FILE} and {TENSORS_FILE})")
    try:
        record = FeaturizerRecord.model_validate_json((folder / RECORD_FILE).read_text())
    except ValueError as e:
        raise FeaturizerLoadError(f"{folder / RECORD_FILE}: unreadable record ({str(e).splitlines()[0]})") from None
    cls = SAVABLE.get(record.featurizer_class)
    if cls is None:
        raise FeaturizerLoadError(f"{folder}: unknown featurizer class {record.featurizer_class!r}")
    try:
        featurizer = cls.from_tensors(load_file(str(folder / TENSORS_FILE)), id=record.id)  # type: ignore[attr-defined]
    except (KeyError, ValueError, OSError) as e:
        raise FeaturizerLoadError(f"{folder / TENSORS_FILE}: not a {record.featurizer_class} ({e!r})") from None
    if featurizer.weights_sha256() != record.sha256:
        raise FeaturizerLoadError(f"{folder}: tensors do not match the record's sha256 (file damaged or replaced)")
    return featurizer, record


#: Tensor names of the public SAE layouts, mapped to SAEFeaturizer's (W_enc (d, m), W_dec (m, d)).
SAE_LAYOUTS: dict[str, dict[str, str]] = {
    # SAELens and Gemma Scope: W_enc (d, m), b_enc, W_dec (m, d), b_dec, optional threshold (JumpReLU)
    "saelens": {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec", "threshold": "threshold"},
    # torch.nn.Linear modules: encoder.weight (m, d), decoder.weight (d, m)
    "linear_modules": {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "decoder.weight",
                       "b_dec": "decoder.bias", "threshold": "threshold"},
}


def load_sae(path: str | Path, subtract_decoder_bias: bool = False, id: str | None = None) -> SAEFeaturizer:
    """An `SAEFeaturizer` from a safetensors file in a public layout (`SAE_LAYOUTS`, detected from the names).

    ReLU SAEs and JumpReLU SAEs (with ``threshold``) are supported; a TopK or other activation is not, and a
    file with neither layout stops with one line naming the tensors it has."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAE file {path} does not exist")
    tensors = load_file(str(path))
    for layout, names in SAE_LAYOUTS.items():
        if all(names[k] in tensors for k in ("W_enc", "b_enc", "W_dec", "b_dec")):
            w_enc, w_dec = tensors[names["W_enc"]], tensors[names["W_dec"]]
            if layout == "linear_modules":
                w_enc, w_dec = w_enc.T.contiguous(), w_dec.T.contiguous()
            return SAEFeaturizer(w_enc, tensors[names["b_enc"]], w_dec, tensors[names["b_dec"]],
                                 tensors.get(names["threshold"]), subtract_decoder_bias, id=id or f"sae:{path.stem}")
    raise ValueError(f"{path}: no known SAE layout (tensors: {sorted(tensors)}); expected the names of one of "
                     f"{ {k: sorted(v.values()) for k, v in SAE_LAYOUTS.items()} }")


def load_featurizers(folder: str | Path, component: str | None = None) -> dict[str, Featurizer]:
    """Every featurizer saved in the sub-folders of ``folder``, keyed by the cell id in its record's ``unit``
    (the keys a featurized sweep takes); two featurizers for one cell are refused, and so (with ``component``)
    is one trained at another component than the sweep's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FeaturizerLoadError(f"{folder}: no such folder of saved featurizers")
    out: dict[str, Featurizer] = {}
    for sub in sorted(p for p in folder.iterdir() if (p / RECORD_FILE).is_file()):
        featurizer, record = load_featurizer(sub)
        if not record.unit:
            raise FeaturizerLoadError(f"{sub}: its record names no unit, so no cell can take it")
        if component is not None and record.component != component:
            raise FeaturizerLoadError(f"{sub}: trained at {record.component} of {record.unit}, not at {component}")
        if record.unit in out:
            raise FeaturizerLoadError(f"{folder}: two featurizers for cell {record.unit}")
        out[record.unit] = featurizer
    return out
