"""What identifies a network's weights in a results manifest: a sha256 of their full content.

- Weights the pipeline loaded from files (a local folder, or a hub snapshot in the local cache) are hashed
  file by file; each file's hash is cached by (resolved path, size, modification time) in
  ``$CAUSAL_ABSTRACTION_CACHE/file-sha256.json`` (default ``~/.cache/causal-abstraction``), so an 8B
  checkpoint is read once, and a file rewritten in place (new size or modification time) is hashed again.
- A model handed to the pipeline as an object (possibly edited in memory) is hashed tensor by tensor: every
  parameter and buffer's name, shape, dtype and bytes.

Both also keep the cheap probe of the first and last 16 values of every parameter, which catches an in-memory
edit of a file-loaded model's parameters at those places.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from causal.results import atomic_write_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CHUNK = 1 << 24


def cache_dir() -> Path:
    return Path(os.environ.get("CAUSAL_ABSTRACTION_CACHE", Path.home() / ".cache" / "causal-abstraction"))


def weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a checkpoint folder (sorted), e.g. ``model.safetensors`` or its shards."""
    root = Path(folder)
    return sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, cached by (resolved path, size, modification time in ns)."""
    real = Path(path).resolve()
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    store = cache_dir() / "file-sha256.json"
    try:
        cached = json.loads(store.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return str(cached[key])
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    value = digest.hexdigest()
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fresh = {k: v for k, v in cached.items() if not k.startswith(f"{real}|")}  # drop stale versions of this file
        atomic_write_json(store, {**fresh, key: value})
    except OSError:
        pass  # an unwritable cache only costs a rehash next time
    return value


def files_sha256(paths: Iterable[Path]) -> str:
    """One sha256 over the names and content hashes of several files."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{Path(path).name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def tensors_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: name, shape, dtype and the full bytes."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}\n".encode())
        if data.numel():
            digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))  # no copy of the bytes
    return digest.hexdigest()


def weights_probe(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and first/last 16 values (cheap; not an identity alone)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().flatten()
        sample = torch.cat([flat[:16], flat[-16:]]).float().cpu().numpy()
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


def weights_identity(model: torch.nn.Module, files: list[Path] | None) -> dict[str, Any]:
    """``weights_sha256`` (full content: of ``files`` when the weights came from them, else of the tensors),
    ``weights_hashed_from`` ("files" or "memory") and ``weights_probe_sha256``."""
    if files:
        return {"weights_sha256": files_sha256(files), "weights_hashed_from": "files",
                "weights_probe_sha256": weights_probe(model)}
    return {"weights_sha256": tensors_sha256(model), "weights_hashed_from": "memory",
            "weights_probe_sha256": weights_probe(model)}
