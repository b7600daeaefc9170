"""Shared fixtures: tiny character-level tokenizers and tiny random-weight causal LMs (never downloaded).

Every model is built from a config with a fixed seed, saved in HF format (weights + tokenizer) to a
session temp folder, and loaded back through ``LMPipeline(folder)`` -- the real local-folder path.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# torch / transformers / experiments are imported inside the fixtures: the torch-free test modules
# of this suite must not pay for them.

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.digits) + ["+", "=", " "] + list(string.ascii_lowercase) + ["?", ".", ":"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

FAMILIES = ("gpt2", "llama", "gemma2", "olmo2", "qwen2")

# Larger-than-default init so that patches visibly move the greedy output of a random network.
INIT_RANGE = 0.2


@pytest.fixture(scope="session", autouse=True)
def _private_hash_cache(tmp_path_factory):
    """Weight-file hashes are cached under $CAUSAL_ABSTRACTION_CACHE: keep the suite's cache out of $HOME."""
    import os

    os.environ["CAUSAL_ABSTRACTION_CACHE"] = str(tmp_path_factory.mktemp("hash-cache"))


def _single_thread() -> None:
    """Tiny tensors: one intra-op thread is several times faster than two on a shared 2-core machine."""
    import torch

    torch.set_num_threads(1)


def make_tokenizer(two_digit_tokens: bool = False):
    """Char-level WordLevel tokenizer; with ``two_digit_tokens`` numbers split into "12","3" style chunks."""
    from transformers import PreTrainedTokenizerFast

    vocab_list = SPECIALS + CHARS
    if two_digit_tokens:
        vocab_list = vocab_list + [f"{a}{b}" for a in string.digits for b in string.digits]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    pattern = r"\d{1,2}|." if two_digit_tokens else "."
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def _common(vocab_size: int) -> dict:
    return {"vocab_size": vocab_size, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def make_model(family: str, vocab_size: int):
    """A seeded random-weight model of ``family`` (one of FAMILIES), in eval mode."""
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Olmo2Config,
        Olmo2ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    _single_thread()
    common = _common(vocab_size)
    if family == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, initializer_range=INIT_RANGE, **common)
        cls = GPT2LMHeadModel
    elif family == "llama":
        config = LlamaConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=64, initializer_range=INIT_RANGE, **common,
        )
        cls = LlamaForCausalLM
    elif family == "gemma2":
        # head_dim * heads = 128 != hidden_size = 64; default softcapping and sliding window kept
        config = Gemma2Config(
            tie_word_embeddings=False,  # tied + sqrt(hidden)-scaled embeddings: it would echo the last token
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=32, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=64, initializer_range=INIT_RANGE,
            query_pre_attn_scalar=32, **common,
        )
        cls = Gemma2ForCausalLM
    elif family == "olmo2":
        config = Olmo2Config(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, max_position_embeddings=64, initializer_range=INIT_RANGE, **common,
        )
        cls = Olmo2ForCausalLM
    elif family == "qwen2":
        config = Qwen2Config(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=64, initializer_range=INIT_RANGE, **common,
        )
        cls = Qwen2ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(1234)
    return cls(config).eval()


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def two_digit_tokenizer():
    return make_tokenizer(two_digit_tokens=True)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, char_tokenizer) -> dict[str, Path]:
    """family -> saved HF folder (model + tokenizer)."""
    dirs = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        make_model(family, len(char_tokenizer)).save_pretrained(folder)
        char_tokenizer.save_pretrained(folder)
        dirs[family] = folder
    return dirs


@pytest.fixture(scope="session")
def pipelines(model_dirs) -> dict:
    """family -> LMPipeline loaded from the saved folder (shared: tests must not mutate weights)."""
    from experiments.pipeline import LMPipeline

    return {family: LMPipeline(str(folder), max_new_tokens=3, device="cpu") for family, folder in model_dirs.items()}


@pytest.fixture(scope="session")
def two_digit_pipeline(tmp_path_factory, two_digit_tokenizer):
    """A tiny Llama whose tokenizer splits numbers into chunks of up to two digits."""
    from experiments.pipeline import LMPipeline

    folder = tmp_path_factory.mktemp("tiny-llama-2digit")
    make_model("llama", len(two_digit_tokenizer)).save_pretrained(folder)
    two_digit_tokenizer.save_pretrained(folder)
    return LMPipeline(str(folder), max_new_tokens=3, device="cpu")
