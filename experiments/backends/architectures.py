"""The component map of each architecture family, declared once as data and read by both backends.

A family says where each component of ``experiments.backends.sites.COMPONENTS`` lives: a module path
(``{layer}`` is the block index), whether the activation is that module's input or output, and
whether it is split into heads ((B, T, H·d) ↔ (B, T, H, d)); plus the final norm before the
unembedding. ``mlp_neurons`` is the input of the MLP's output projection (the post-activation neurons). Families are found by layout, so
new model classes that follow a known layout (OLMo 2, Qwen 3, Gemma 3 …) work without listing:

- ``decoder_layers``: ``model.layers[i]`` with ``self_attn.o_proj`` and ``mlp`` (Llama, Mistral,
  Gemma/Gemma 2, Qwen 2, OLMo/OLMo 2 …);
- ``gpt2``: ``transformer.h[i]`` with ``attn.c_proj`` and ``mlp`` (GPT-2 and its Conv1D layout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

Side = Literal["input", "output"]


class UnsupportedModelError(ValueError):
    """The model's architecture matches no known component layout."""


@dataclass(frozen=True)
class ComponentHook:
    """Where a component lives: ``module`` path template, hook ``side``, and whether it is split per head."""

    module: str
    side: Side
    split_heads: bool = False


@dataclass(frozen=True)
class ArchitectureFamily:
    """A layout: how to find the blocks and every component inside them."""

    name: str
    layers: str
    components: dict[str, ComponentHook]
    final_norm: str

    def matches(self, model: torch.nn.Module) -> bool:
        try:
            blocks = get_module(model, self.layers)
            if not len(blocks):
                return False
            for path in [hook.module for hook in self.components.values()] + [self.final_norm]:
                get_module(model, path.format(layer=0))
        except (AttributeError, IndexError, TypeError):
            return False
        return True


FAMILIES: tuple[ArchitectureFamily, ...] = (
    ArchitectureFamily(
        name="decoder_layers",
        layers="model.layers",
        components={
            "block_input": ComponentHook("model.layers[{layer}]", "input"),
            "block_output": ComponentHook("model.layers[{layer}]", "output"),
            "attention_output": ComponentHook("model.layers[{layer}].self_attn", "output"),
            "mlp_output": ComponentHook("model.layers[{layer}].mlp", "output"),
            "head_attention_value_output": ComponentHook("model.layers[{layer}].self_attn.o_proj", "input", True),
            "mlp_neurons": ComponentHook("model.layers[{layer}].mlp.down_proj", "input"),
        },
        final_norm="model.norm",
    ),
    ArchitectureFamily(
        name="gpt2",
        layers="transformer.h",
        components={
            "block_input": ComponentHook("transformer.h[{layer}]", "input"),
            "block_output": ComponentHook("transformer.h[{layer}]", "output"),
            "attention_output": ComponentHook("transformer.h[{layer}].attn.resid_dropout", "output"),
            "mlp_output": ComponentHook("transformer.h[{layer}].mlp", "output"),
            "head_attention_value_output": ComponentHook("transformer.h[{layer}].attn.c_proj", "input", True),
            "mlp_neurons": ComponentHook("transformer.h[{layer}].mlp.c_proj", "input"),
        },
        final_norm="transformer.ln_f",
    ),
)

_PATH_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?")


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """``get_module(model, "model.layers[3].mlp")``: attribute/index path lookup (AttributeError if absent)."""
    module = root
    for part in path.split("."):
        match = _PATH_PART.fullmatch(part)
        if match is None:
            raise AttributeError(f"bad module path {path!r}")
        module = getattr(module, match.group(1))
        if match.group(2) is not None:
            module = module[int(match.group(2))]
    return module


def family_of(model: torch.nn.Module) -> ArchitectureFamily:
    """The first family whose layout the model has."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported: its layout matches none of "
        f"{', '.join(f.name + ' (' + f.layers + ')' for f in FAMILIES)}"
    )


def head_width(model: torch.nn.Module) -> int:
    """Per-head width of the attention value output, read off the output projection's weight
    (never from ``hidden_size``: Gemma 2 has heads × head_dim ≠ hidden)."""
    family = family_of(model)
    proj = get_module(model, family.components["head_attention_value_output"].module.format(layer=0))
    in_features = proj.weight.shape[0] if type(proj).__name__ == "Conv1D" else proj.weight.shape[1]
    return in_features // int(model.config.num_attention_heads)


def site_width(model: torch.nn.Module, component: str) -> int:
    """The last dimension of a component's activation: d_head for head sites, the MLP's hidden width for
    ``mlp_neurons`` (read off the output projection's weight), the residual width otherwise."""
    if component == "head_attention_value_output":
        return head_width(model)
    if component == "mlp_neurons":
        proj = get_module(model, family_of(model).components["mlp_neurons"].module.format(layer=0))
        return int(proj.weight.shape[0] if type(proj).__name__ == "Conv1D" else proj.weight.shape[1])
    return int(model.config.hidden_size)
