"""MLP neurons: an MLP neuron is an index into the MLP's hidden activation, i.e. into the input of
its down projection (``mlp.down_proj`` in Llama-style blocks, ``mlp.c_proj`` in GPT-2).

:func:`ablate_neurons` sets chosen neurons to zero (or to given values) in every forward inside
the block; :func:`neuron_activations` records them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from experiments.architectures import family_of, get_module


def down_projection(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The down projection of block ``layer``'s MLP (its input is the neuron activation), from the component map."""
    family = family_of(model)
    blocks = get_module(model, family.layers)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} out of range: the model has {len(blocks)} blocks")
    return get_module(model, family.mlp_neurons.format(layer=layer))


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
    handles = []
    try:
        for layer, idx in neurons.items():
            proj = down_projection(model, layer)
            width = proj.in_features if hasattr(proj, "in_features") else proj.weight.shape[0]
            index = torch.tensor(list(idx), dtype=torch.long)
            if len(index) and (index.min() < 0 or index.max() >= width):
                raise ValueError(f"neuron index out of range for layer {layer} (MLP width {width}): {list(idx)}")
            fill = None if values is None else values[layer]

            def hook(module, args, index=index, fill=fill):
                hidden = args[0].clone()
                ix = index.to(hidden.device)
                hidden[..., ix] = 0 if fill is None else fill.to(hidden.device, hidden.dtype)
                return (hidden, *args[1:])

            handles.append(proj.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def neuron_activations(model: torch.nn.Module, layer: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, width) MLP hidden activations of ``layer`` for one forward of ``inputs``."""
    captured: list[torch.Tensor] = []
    handle = down_projection(model, layer).register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured[0]
