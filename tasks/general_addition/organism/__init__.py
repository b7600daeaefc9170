"""Addition model organism: a small Llama trained from scratch on 2- and 3-digit addition.

Prompts look like ``"58+67="`` (both addends zero-padded to the same width, 2 or 3 digits);
the answer is ``str(int(a) + int(b))`` followed by EOS. The checkpoint in :data:`ORGANISM_DIR`
is produced by ``python -m tasks.general_addition.organism.train_organism``.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

ORGANISM_DIR: Path = Path(__file__).resolve().parent / "addition-llama"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
CHARACTERS: tuple[str, ...] = tuple(string.digits) + ("+", "=", " ", "?") + tuple(string.ascii_lowercase)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, ``<s>`` prepended, left padding."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B:1",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=32,
    )
