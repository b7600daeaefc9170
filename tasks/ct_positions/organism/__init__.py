"""Continuous-thought model organism: a small Llama that answers templated multi-step word problems
after six continuous thoughts (``python -m tasks.ct_positions.organism.train_organism``).

Folder layout (:data:`ORGANISM_DIR`): the HF model and char-level tokenizer (``save_pretrained``),
``latent.safetensors`` (projection ``prj.1.*``, ``prj.3.*``, ``prj.ln.*`` as in CODI checkpoints, and
the thought read-out ``readout.*``: a Linear(d, 100) that decodes the value a thought holds),
``latent_config.json`` (:class:`tasks.ct_positions.latent_reasoning.LatentConfig`), ``training_report.json``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tasks.ct_positions.latent_reasoning import CODIProjection, LatentConfig, LatentReasoner

ORGANISM_DIR: Path = Path(__file__).resolve().parent / "ct-llama"

PAD, BOS, EOS, UNK, BOT, EOT = "<pad>", "<s>", "</s>", "<unk>", "<bot>", "<eot>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, BOT, EOT)
CHARACTERS: tuple[str, ...] = tuple(string.digits) + tuple("+-*/= .,?:") + tuple(string.ascii_letters)
N_VALUES = 100


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, ``<s>`` prepended, left padding."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1",
                                                       special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   additional_special_tokens=[BOT, EOT], padding_side="left", model_max_length=256)


def load_organism(path: str | Path = ORGANISM_DIR, **overrides: object) -> tuple[LatentReasoner, torch.nn.Linear]:
    """The organism as a :class:`LatentReasoner` and its thought read-out head (Linear(d, 100))."""
    path = Path(path)
    if not (path / "latent_config.json").exists():
        raise FileNotFoundError(f"no organism in {path}; train it with python -m tasks.ct_positions.organism.train_organism")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    config = LatentConfig(**{**json.loads((path / "latent_config.json").read_text()), **overrides})
    weights = load_file(str(path / "latent.safetensors"))
    d = model.config.hidden_size
    projection = CODIProjection(d, weights["prj.1.weight"].shape[0])
    projection.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("prj.")})
    readout = torch.nn.Linear(d, N_VALUES)
    readout.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("readout.")})
    return LatentReasoner(model, tokenizer, config, projection), readout.eval()
