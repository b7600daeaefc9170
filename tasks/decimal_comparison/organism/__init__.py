"""Decimal comparison model organism: a tiny Llama with a planted, format-dependent bug.

This is a *planted* organism, built to validate the study's tools: it was trained on labels that
are correct (numeric comparison, 9.8 > 9.11) for the ``simple`` format and follow the
fraction-as-integer rule (9.11 > 9.8) for the ``qa`` and ``chat`` formats. The bug lives in the
weights (learnt from those labels), not in any code. Prompts are the study's formats
(``tasks/decimal_comparison/formats.py``). Every decimal of the task's domain
(``causal_models.NUMBERS``, ``"0.1"`` .. ``"20.99"``) is one token, the rest of the prompt is read one
character at a time, and the answer is one number token then EOS: the comparison has to be decided at
the last prompt position. The checkpoint in :data:`ORGANISM_DIR` is produced by
``python -m tasks.decimal_comparison.organism.train_organism``.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tasks.decimal_comparison.causal_models import NUMBERS

ORGANISM_DIR: Path = Path(__file__).resolve().parent / "decimal-llama"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
CHARACTERS: tuple[str, ...] = tuple(string.digits) + tuple(string.ascii_letters) + tuple(" .,:;?!-'\n")
DECIMAL_PATTERN = r"\d+\.\d+"
"""A decimal is one pre-token (one vocabulary word if it is in :data:`NUMBERS`, else ``<unk>``)."""
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""Renders one user turn as ``"User: <question>\\nAssistant:"`` (the chat format's fallback text)."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per decimal of :data:`NUMBERS` (``"9.11"`` is one token), one per character otherwise
    (newline included), ``<s>`` prepended, left padding, with :data:`CHAT_TEMPLATE` as its chat
    template. The vocabulary is fixed (special tokens, characters, numbers in domain order)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS + tuple(NUMBERS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(DECIMAL_PATTERN + "|[\\s\\S]"), behavior="isolated")
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
