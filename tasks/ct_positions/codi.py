"""Load CODI-format continuous-thought checkpoints from a local folder (no peft needed).

A CODI checkpoint is one safetensors file holding the state dict of the whole training wrapper:
the base HF model wrapped by a peft LoRA adapter (keys ``codi.base_model.model.<module>``, LoRA
layers as ``<module>.base_layer.weight`` + ``<module>.lora_A.default.weight`` (r, in) +
``<module>.lora_B.default.weight`` (out, r)), embeddings resized to ``V + 3`` (raw ids pad = V,
bot = V + 1, eot = V + 2, V = the base vocabulary size), and the projection ``prj.1.*``, ``prj.3.*``,
``prj.ln.*``. :func:`load_codi` rebuilds the base model (hub name, local folder or config), resizes
the embeddings, loads every base weight found in the file, and merges each LoRA pair into its
weight: ``W += (alpha / r) * B @ A`` (transposed for GPT-2's Conv1D, which stores (in, out)).

Inference defaults follow the reference evaluation: question tokens (+ ``eos`` unless
``remove_eos``) + bot; six thoughts through ``prj``; eot (+ ``eos`` unless ``remove_eos``); greedy
decoding over logits[: V + 2] until EOS; the answer is the last number in the text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from tasks.ct_positions.latent_reasoning import CODIProjection, LatentConfig, LatentReasoner

LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
}
PROJECTION_SIZE: dict[str, int] = {"gpt2": 768, "llama": 2048}
_PREFIXES = ("codi.", "base_model.model.")
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


class CODILoadError(ValueError):
    """The folder does not hold a usable CODI checkpoint."""


class CODISpec(BaseModel):
    """How to rebuild a CODI model. ``base``: hub name or local folder of the base model (its
    config, tokenizer and — for weights missing from the checkpoint — its weights)."""

    model_config = ConfigDict(extra="forbid")
    base: str
    lora_alpha: float = 32.0
    lora_r: int | None = Field(None, description="default: read off the saved A matrices (128 in the reference)")
    num_thoughts: int = 6
    remove_eos: bool = True
    max_new_tokens: int = 256
    attention_mask_in_latent: bool = False
    weights_from_base: bool = Field(True, description="load the base weights first (needs them locally or on the hub)")


def find_weights(folder: Path) -> Path:
    """The single safetensors file of a checkpoint folder."""
    if not folder.is_dir():
        raise CODILoadError(f"checkpoint folder {folder} does not exist")
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        hint = " (.bin files are not read: convert them to safetensors)" if list(folder.glob("*.bin")) else ""
        raise CODILoadError(f"expected exactly one .safetensors file in {folder}, found {[f.name for f in files]}{hint}")
    return files[0]


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]],
                                                             dict[str, torch.Tensor]]:
    """Wrapper state dict -> (base weights by HF name, LoRA {module: {"A", "B"}}, projection ``prj`` weights)."""
    base: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    prj: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("prj."):
            prj[key[4:]] = tensor
            continue
        name = key
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        match = _LORA.match(name)
        if match:
            lora.setdefault(match["module"], {})[match["which"]] = tensor
            continue
        base[name.replace(".base_layer.", ".")] = tensor
    broken = [m for m, ab in lora.items() if set(ab) != {"A", "B"}]
    if broken:
        raise CODILoadError(f"LoRA modules without both A and B matrices: {broken[:5]}")
    return base, lora, prj


def merge_lora(model: nn.Module, lora: dict[str, dict[str, torch.Tensor]], alpha: float, r: int | None = None) -> int:
    """Add ``(alpha / r) * B @ A`` into each module's weight (Conv1D: transposed); returns the count."""
    for module_name, ab in lora.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError as exc:
            raise CODILoadError(f"LoRA module {module_name!r} is not in the base model") from exc
        a, b = ab["A"].float(), ab["B"].float()
        rank = r if r is not None else a.shape[0]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise CODILoadError(f"LoRA {module_name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not have rank {rank}")
        delta = (b @ a) * (alpha / rank)
        if isinstance(module, Conv1D):
            delta = delta.T
        if delta.shape != module.weight.shape:
            raise CODILoadError(f"LoRA {module_name}: update {tuple(delta.shape)} != weight {tuple(module.weight.shape)}")
        with torch.no_grad():
            module.weight += delta.to(module.weight.dtype)
    return len(lora)


def family_name(config: PretrainedConfig) -> str:
    return "gpt2" if config.model_type == "gpt2" else "llama"


def build_base(spec: CODISpec, config: PretrainedConfig | None = None, dtype: torch.dtype = torch.float32
               ) -> PreTrainedModel:
    """The base model (from ``spec.base``, or randomly initialised from ``config``), embeddings resized to V + 3."""
    if config is not None:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif spec.weights_from_base:
        model = AutoModelForCausalLM.from_pretrained(spec.base, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec.base), dtype=dtype)
    vocab = int(model.config.vocab_size)
    model.resize_token_embeddings(vocab + 3, mean_resizing=False)
    model.config.codi_base_vocab_size = vocab
    return model


def codi_latent_config(spec: CODISpec, vocab: int, eos_id: int | None) -> LatentConfig:
    """Reference inference settings: raw ids pad = V, bot = V + 1, eot = V + 2."""
    pad, bot, eot = vocab, vocab + 1, vocab + 2
    extra = [] if spec.remove_eos or eos_id is None else [eos_id]
    return LatentConfig(num_thoughts=spec.num_thoughts, bot_ids=extra + [bot], eot_ids=[eot] + extra,
                        max_new_tokens=spec.max_new_tokens, stop_ids=[eos_id] if eos_id is not None else [],
                        pad_id=pad, attention_mask_in_latent=spec.attention_mask_in_latent,
                        answer_vocab_limit=vocab + 2)


def load_codi(folder: str | Path, spec: CODISpec, config: PretrainedConfig | None = None, tokenizer: Any = None,
              device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LatentReasoner:
    """A :class:`LatentReasoner` for the CODI checkpoint in ``folder`` (LoRA merged, projection loaded).

    ``config``/``tokenizer`` replace what would be read from ``spec.base`` (tests, offline use)."""
    state = load_file(str(find_weights(Path(folder))))
    base_weights, lora, prj = split_state_dict(state)
    if not prj:
        raise CODILoadError(f"no projection (prj.*) weights in {folder}")
    model = build_base(spec, config, dtype)
    vocab = int(model.config.codi_base_vocab_size)
    own = model.state_dict()
    mismatched = [k for k, v in base_weights.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CODILoadError(f"weights with the wrong shape for this base model: {mismatched[:5]}")
    unknown = [k for k in base_weights if k not in own]
    if unknown:
        raise CODILoadError(f"checkpoint weights the base model does not have: {unknown[:5]}")
    model.load_state_dict(base_weights, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    merge_lora(model, lora, spec.lora_alpha, spec.lora_r)
    d = model.config.hidden_size
    projection = CODIProjection(d, prj["1.weight"].shape[0])
    projection.load_state_dict(prj)
    model.to(device)
    projection.to(device, dtype)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(spec.base)
    return LatentReasoner(model, tokenizer, codi_latent_config(spec, vocab, tokenizer.eos_token_id), projection)


# ---------------------------------------------------------------------------- writing the format
def lora_targets(model: nn.Module, family: str) -> list[str]:
    """Module names a CODI adapter targets in ``model`` (by last name component)."""
    wanted = set(LORA_TARGETS[family])
    return [name for name, m in model.named_modules() if name.split(".")[-1] in wanted
            and isinstance(m, (nn.Linear, Conv1D)) and "lm_head" not in name]


def save_codi_checkpoint(path: str | Path, model: PreTrainedModel, projection: CODIProjection,
                         lora: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write ``model`` (already resized to V + 3, unmerged), ``lora`` and ``projection`` as one wrapper
    state dict with the reference key names (used to build test checkpoints)."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        name = key if module not in lora else f"{module}.base_layer.{key.rsplit('.', 1)[1]}"
        state[f"codi.base_model.model.{name}"] = tensor.detach().clone().contiguous()
    for module, ab in lora.items():
        for which in ("A", "B"):
            state[f"codi.base_model.model.{module}.lora_{which}.default.weight"] = ab[which].contiguous()
    for key, tensor in projection.state_dict().items():
        state[f"prj.{key}"] = tensor.detach().contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    return path
