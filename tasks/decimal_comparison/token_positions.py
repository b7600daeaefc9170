"""Role-matched token positions: the same role in prompts of different formats (and lengths).

Formats differ in length (``"Q: ...\\nA:"`` vs ``"...\\nAnswer:"`` vs a chat template), so a patch from
one format into another matches tokens by *role*, never by index. Each role's indexer reads the
setting's own format, so one :class:`TokenPosition` locates the role on the base side and, through
its ``counterfactual_indexer``, on the counterfactual side in the other format:

* ``x``, ``y``: the tokens of each decimal; ``qmark``: the token holding the question mark;
* ``numbers``: every token from the start of ``x`` to the end of ``y`` (``"9.8 or 9.11"``);
* ``question``: every token of the question (``"Which is bigger: 9.8 or 9.11?"``);
* ``prev``, ``last``: the last two prompt tokens (where the answer is read);
* ``matched``: all of the above together (every token with a counterpart in the other format);
* ``bos`` (only if the tokenizer adds one): the first token; ``all``: every prompt token (for
  ablations, which need no counterpart); ``format``: the format's own tokens (outside the question,
  not BOS, not the last token: ``"Q: "``, ``"\\nA"``), for attention blocking, which needs no counterpart.
"""

from __future__ import annotations

from typing import Any, Callable

from experiments.pipeline import LMPipeline
from experiments.token_positions import TokenPosition, TokenPositionError, char_span_token_indices
from tasks.decimal_comparison.formats import role_spans

ROLES: tuple[str, ...] = ("x", "y", "qmark", "numbers", "prev", "last", "matched")
DEFAULT_SWEEP_ROLES: tuple[str, ...] = ("matched", "x", "y", "qmark", "last")


def _span_tokens(pipeline: LMPipeline, setting: dict[str, Any], role: str) -> list[int]:
    spans = role_spans(setting["raw_input"], setting["x"], setting["y"])
    if role == "numbers":
        start, end = spans["x"][0], spans["y"][1]
    else:
        start, end = spans[role]
    return char_span_token_indices(pipeline, setting, start, end)


def role_indices(pipeline: LMPipeline, setting: dict[str, Any], role: str) -> list[int]:
    """Unpadded token indices of ``role`` in ``setting`` (any format)."""
    n = len(pipeline.tokenize_one(setting)["input_ids"])
    if role in ("x", "y", "qmark", "numbers", "question"):
        return _span_tokens(pipeline, setting, role)
    if role == "last":
        return [n - 1]
    if role == "prev":
        return [n - 2]
    if role == "bos":
        return [0]
    if role == "all":
        return list(range(n))
    if role == "format":
        question = set(_span_tokens(pipeline, setting, "question"))
        first = 1 if adds_bos(pipeline) else 0
        own = [i for i in range(first, n - 1) if i not in question]
        if not own:
            raise TokenPositionError(f"the prompt {setting['raw_input']!r} has no format tokens besides the last")
        return own
    if role == "matched":
        chosen = set(_span_tokens(pipeline, setting, "numbers")) | set(_span_tokens(pipeline, setting, "qmark"))
        chosen |= {n - 2, n - 1}
        return sorted(chosen)
    raise TokenPositionError(f"unknown role {role!r}; known: {', '.join(ROLES + ('bos', 'all'))}")


def adds_bos(pipeline: LMPipeline) -> bool:
    """Whether every prompt starts with the tokenizer's BOS token (so token 0 is a shared role)."""
    bos = pipeline.tokenizer.bos_token_id
    ids = pipeline.tokenize_one({"raw_input": "Which?"})["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def role_position(pipeline: LMPipeline, role: str) -> TokenPosition:
    """The position of ``role``; base and counterfactual sides are each located in their own format."""
    if role == "bos" and not adds_bos(pipeline):
        raise TokenPositionError(f"{pipeline.name}'s tokenizer adds no BOS token: token 0 has no shared role")
    indexer: Callable[[dict[str, Any]], list[int]] = lambda s, role=role: role_indices(pipeline, s, role)  # noqa: E731
    return TokenPosition(indexer, pipeline, id=role, counterfactual_indexer=indexer)


def role_positions(pipeline: LMPipeline, roles: tuple[str, ...] | list[str] = DEFAULT_SWEEP_ROLES) -> list[TokenPosition]:
    return [role_position(pipeline, r) for r in roles]


def key_roles(pipeline: LMPipeline) -> list[TokenPosition]:
    """Roles that align keys in attention transplants: ``bos`` (if any), the whole ``question`` and the
    last two tokens; keys of the format's own tokens (``"Q: "``, ``"\\nAnswer"`` ...) have no
    counterpart and get probability 0 (rows renormalised)."""
    roles = ["bos"] if adds_bos(pipeline) else []
    return [role_position(pipeline, r) for r in roles + ["question", "prev", "last"]]
