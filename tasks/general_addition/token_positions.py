"""Token positions of the addition prompt, for tokenizers that split numbers differently.

Every position is found through character offsets, so it is right for any tokenizer; the
per-family config below only says which *set* of positions is meaningful:
- one token per digit (the organism, Gemma 2, Qwen 2, Llama 2, Mistral): one position per digit,
  ``digit_{addend}_{place}`` (place 0 = ones, as in the causal model);
- numbers chunked into multi-digit tokens (Llama 3, OLMo 2: up to 3 digits; GPT-2: BPE merges):
  one position per addend, ``addend_{k}`` (the last token of the addend), since several digits share a token.
Plus ``op`` (the first token after addend 0, e.g. "+"), ``eq`` (the first token after addend 1,
e.g. "=" or "?"; omitted where it is the last token) and ``last`` (the final prompt token, where the
answer is read).
"""

from __future__ import annotations

from typing import Any

from experiments.pipeline import LMPipeline
from experiments.token_positions import TokenPosition, TokenPositionError, char_span_token_indices
from tasks.general_addition.causal_models import (
    DEFAULT_TEMPLATE,
    PROMPT_TEMPLATES,
    addends_of,
    digit_var,
    setting_from_addends,
)

#: model_type (from the HF config) -> how its tokenizer writes numbers.
TOKENIZATION_BY_FAMILY: dict[str, str] = {
    "organism": "one_token_per_digit",
    "gemma": "one_token_per_digit",
    "gemma2": "one_token_per_digit",
    "gemma3_text": "one_token_per_digit",
    "qwen2": "one_token_per_digit",
    "qwen3": "one_token_per_digit",
    "mistral": "one_token_per_digit",
    "llama": "detect",  # Llama 2 tokenizers split digits, Llama 3 chunks up to 3
    "olmo2": "multi_digit_tokens",
    "olmo": "multi_digit_tokens",
    "gpt2": "multi_digit_tokens",
}


def addend_spans(
    setting: dict[str, Any], n_digits: int, template: str = DEFAULT_TEMPLATE
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Character spans of the two zero-padded addends in ``raw_input``, located via the prompt template:
    the setting's own ``template`` variable where it has one, else ``template`` (a key of PROMPT_TEMPLATES).

    Only ``raw_input`` is needed (a task with other input variables can use these positions); where the setting
    also holds the digit variables, the prompt must spell them."""
    name = setting.get("template", template)
    if name not in PROMPT_TEMPLATES:
        raise TokenPositionError(f"unknown prompt template {name!r}; known: {sorted(PROMPT_TEMPLATES)}")
    form = PROMPT_TEMPLATES[name]
    a_start = form.index("{a}")
    b_start = a_start + n_digits + len(form[a_start + 3 : form.index("{b}")])
    text = setting["raw_input"]
    a, b = text[a_start : a_start + n_digits], text[b_start : b_start + n_digits]
    if form.format(a=a, b=b) != text or not (a + b).isdigit():
        raise TokenPositionError(f"prompt {text!r} is not template {name!r} with two {n_digits}-digit addends")
    if digit_var(0, 0) in setting and addends_of(setting) != (int(a), int(b)):
        raise TokenPositionError(f"prompt {text!r} does not spell the setting's digits {addends_of(setting)}")
    return (a_start, a_start + n_digits), (b_start, b_start + n_digits)


def tokenization_of(pipeline: LMPipeline) -> str:
    """"one_token_per_digit" or "multi_digit_tokens", from the config table, checked on the tokenizer."""
    probe = pipeline.tokenize_one("12345+67890=")
    digit_tokens = [
        (s, e) for s, e in probe["offsets"] if e > s and probe["text"][s:e].strip().isdigit()
    ]
    measured = "one_token_per_digit" if all(e - s == 1 for s, e in digit_tokens) else "multi_digit_tokens"
    declared = TOKENIZATION_BY_FAMILY.get(getattr(pipeline.config, "model_type", ""), "detect")
    if declared not in ("detect", measured):
        raise ValueError(
            f"{pipeline.name}: config says {declared} for model_type {pipeline.config.model_type!r} "
            f"but the tokenizer gives {measured}; update TOKENIZATION_BY_FAMILY"
        )
    return measured


def addition_token_positions(
    pipeline: LMPipeline, n_digits: int, template: str = DEFAULT_TEMPLATE
) -> list[TokenPosition]:
    """Positions in prompt order: digits (or addends), ``op``, ``eq`` and ``last``.

    The indexers read only ``raw_input``: ``template`` (a key of PROMPT_TEMPLATES) is the prompt format of
    settings that carry no ``template`` variable of their own (e.g. another task's ``{"raw_input": "58+67="}``).

    ``eq`` is left out where it is the last token of the tokenised prompt ("58+67=" without a chat
    template): one cell per token is enough.
    """
    probe = setting_from_addends(0, 0, n_digits, template)
    prompt_length = len(pipeline.tokenize_one(probe)["input_ids"])
    positions: list[TokenPosition] = []
    per_digit = tokenization_of(pipeline) == "one_token_per_digit"
    for addend in (0, 1):
        if per_digit:
            for place in reversed(range(n_digits)):
                def digit_indexer(s: dict[str, Any], addend: int = addend, place: int = place) -> list[int]:
                    start = addend_spans(s, n_digits, template)[addend][0] + (n_digits - 1 - place)
                    return char_span_token_indices(pipeline, s, start, start + 1)[-1:]

                positions.append(TokenPosition(digit_indexer, pipeline, id=digit_var(addend, place)))
        else:
            def addend_indexer(s: dict[str, Any], addend: int = addend) -> list[int]:
                start, end = addend_spans(s, n_digits, template)[addend]
                return char_span_token_indices(pipeline, s, start, end)[-1:]

            positions.append(TokenPosition(addend_indexer, pipeline, id=f"addend_{addend}"))
        def after_indexer(s: dict[str, Any], addend: int = addend) -> list[int]:
            end = addend_spans(s, n_digits, template)[addend][1]
            if end >= len(s["raw_input"]):
                raise TokenPositionError(f"nothing follows addend {addend} in {s['raw_input']!r}")
            covering_end = char_span_token_indices(pipeline, s, end - 1, end)[-1]
            following = char_span_token_indices(pipeline, s, end, len(s["raw_input"]))
            return [next(i for i in following if i > covering_end)] if any(i > covering_end for i in following) else following[:1]

        after = TokenPosition(after_indexer, pipeline, id="op" if addend == 0 else "eq")
        if not (after.id == "eq" and after.index(probe) == [prompt_length - 1]):
            positions.append(after)
    positions.append(TokenPosition(lambda s: [-1], pipeline, id="last"))
    return positions

