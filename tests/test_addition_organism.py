"""Checks on the shipped addition model organism (tokenizer behaviour and greedy accuracy)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tasks.general_addition.organism import ORGANISM_DIR, build_tokenizer

pytestmark = pytest.mark.exactness  # part of the newest-releases canary

N_PER_WIDTH = 300


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(ORGANISM_DIR)


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(ORGANISM_DIR).eval()


def random_problems(width: int, n: int, seed: int) -> list[tuple[str, str]]:
    """Fixed random sample of zero-padded addend pairs of the given width."""
    rng = random.Random(seed)
    return [(f"{rng.randrange(10**width):0{width}d}", f"{rng.randrange(10**width):0{width}d}") for _ in range(n)]


def test_one_token_per_character_with_bos(tokenizer: PreTrainedTokenizerBase) -> None:
    enc = tokenizer("58+67=", return_offsets_mapping=True)
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"]) == ["<s>", "5", "8", "+", "6", "7", "="]
    assert enc["offset_mapping"] == [(0, 0)] + [(i, i + 1) for i in range(6)]
    assert len(tokenizer("007+120=")["input_ids"]) == 9
    text = "is 9 bigger than 12?"
    assert tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]) == ["<s>", *text]
    assert tokenizer.decode(tokenizer("125")["input_ids"], skip_special_tokens=True) == "125"


def test_left_padding_mixed_widths(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["05+23=", "007+120="], padding=True, return_tensors="pt")
    pad, bos = tokenizer.pad_token_id, tokenizer.bos_token_id
    assert batch["input_ids"][0, :2].tolist() == [pad, pad]
    assert batch["input_ids"][0, 2].item() == bos and batch["input_ids"][1, 0].item() == bos
    assert batch["attention_mask"].tolist() == [[0, 0] + [1] * 7, [1] * 9]
    assert tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["05+23=", "007+120="]


def test_build_tokenizer_matches_shipped(tokenizer: PreTrainedTokenizerBase) -> None:
    built = build_tokenizer()
    assert built.get_vocab() == tokenizer.get_vocab()
    assert built.padding_side == tokenizer.padding_side
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(built, attr) == getattr(tokenizer, attr)
    assert built("58+67=")["input_ids"] == tokenizer("58+67=")["input_ids"]


def test_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    gen = model.generation_config
    assert (gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )


@pytest.mark.slow
@torch.no_grad()
def test_greedy_accuracy_left_padded(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    problems = random_problems(2, N_PER_WIDTH, seed=1) + random_problems(3, N_PER_WIDTH, seed=2)
    random.Random(3).shuffle(problems)
    correct = {2: 0, 3: 0}
    for start in range(0, len(problems), 200):
        chunk = problems[start : start + 200]
        batch = tokenizer([f"{a}+{b}=" for a, b in chunk], padding=True, return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
        completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :])
        for (a, b), text in zip(chunk, completions):
            correct[len(a)] += text.replace(tokenizer.pad_token, "") == f"{int(a) + int(b)}{tokenizer.eos_token}"
    assert correct[2] / N_PER_WIDTH >= 0.99, correct
    assert correct[3] / N_PER_WIDTH >= 0.99, correct
