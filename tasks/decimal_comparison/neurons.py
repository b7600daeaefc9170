"""MLP neurons: an MLP neuron is an index into the MLP's hidden activation, i.e. into the input of
its down projection (``mlp.down_proj`` in Llama-style blocks, ``mlp.c_proj`` in GPT-2).

:func:`ablate_neurons` sets chosen neurons to zero (or to given values) in every forward inside
the block; :func:`neuron_activations` records them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from experiments.backends.architectures import site_width
from experiments.backends import DEFAULT_BACKEND, backend_with, make_backend
from experiments.backends.sites import Site, SiteEdit


def mlp_width(model: torch.nn.Module, layer: int) -> int:
    """Neurons of block ``layer``'s MLP (ValueError for a layer the model does not have)."""
    n_layers = int(model.config.num_hidden_layers)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has {n_layers} blocks")
    return site_width(model, "mlp_neurons")


def parse_neurons(spec: str) -> dict[int, list[int]]:
    """``"10:5,17;12:3"`` -> ``{10: [5, 17], 12: [3]}`` (layer:neuron,neuron;...)."""
    out: dict[int, list[int]] = {}
    for chunk in filter(None, (c.strip() for c in spec.split(";"))):
        if ":" not in chunk:
            raise ValueError(f"neuron list entries are LAYER:N,N,...; got {chunk!r}")
        layer, neurons = chunk.split(":", 1)
        out.setdefault(int(layer), []).extend(int(n) for n in neurons.split(",") if n.strip())
    if not out:
        raise ValueError(f"empty neuron list {spec!r}")
    return out


@contextmanager
def ablate_neurons(
    model: torch.nn.Module,
    neurons: Mapping[int, Sequence[int]],
    values: Mapping[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Inside the block, neuron ``n`` of layer ``l`` reads 0 (or ``values[l][k]`` for the k-th listed
    neuron) at every position of every forward (prompt and decoding)."""
    edits = []
    for layer, idx in neurons.items():
        width = mlp_width(model, layer)
        index = torch.tensor(list(idx), dtype=torch.long)
        if len(index) and (index.min() < 0 or index.max() >= width):
            raise ValueError(f"neuron index out of range for layer {layer} (MLP width {width}): {list(idx)}")
        fill = None if values is None else values[layer]

        def write(hidden: torch.Tensor, index: torch.Tensor = index, fill: torch.Tensor | None = fill) -> torch.Tensor:
            hidden = hidden.clone()
            hidden[..., index.to(hidden.device)] = 0 if fill is None else fill.to(hidden.device, hidden.dtype)
            return hidden

        edits.append(SiteEdit(Site(layer, "mlp_neurons"), write))
    with backend_with("edits", model).edits(edits):
        yield


@torch.no_grad()
def neuron_activations(model: torch.nn.Module, layer: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, width) MLP hidden activations of ``layer`` for one forward of ``inputs``."""
    mlp_width(model, layer)
    site = Site(layer, "mlp_neurons")
    return make_backend(DEFAULT_BACKEND, model).collect([site], inputs)[site]
