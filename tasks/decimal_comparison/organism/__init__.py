"""Decimal comparison model organism: a tiny Llama with a planted, format-dependent bug.

This is a *planted* organism, built to validate the study's tools: it was trained on labels that
are correct (numeric comparison, 9.8 > 9.11) for the ``simple`` format and follow the
fraction-as-integer rule (9.11 > 9.8) for the ``qa`` and ``chat`` formats. The bug lives in the
weights (learnt from those labels), not in any code. Prompts are the study's formats
(``tasks/decimal_comparison/formats.py``); answers are ``" <number>"`` then EOS. The checkpoint in
:data:`ORGANISM_DIR` is produced by ``python -m tasks.decimal_comparison.organism.train_organism``.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

ORGANISM_DIR: Path = Path(__file__).resolve().parent / "decimal-llama"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
CHARACTERS: tuple[str, ...] = tuple(string.digits) + tuple(string.ascii_letters) + tuple(" .,:;?!-'\n")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""Renders one user turn as ``"User: <question>\\nAssistant:"`` (the chat format's fallback text)."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer (one token per character, newline included), ``<s>`` prepended,
    left padding, with :data:`CHAT_TEMPLATE` as its chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", model_max_length=96,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
