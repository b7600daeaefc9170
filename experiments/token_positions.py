"""Token positions: which token indices of a prompt a model unit lives at.

An indexer maps an input setting (a dict with ``raw_input``) to token indices of the
*unpadded* prompt (0 = first token, BOS included if the tokenizer adds one). The engine
adds each row's left-padding offset. A position outside the prompt is an error.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

from experiments.pipeline import LMPipeline

Indexer = Callable[[dict[str, Any]], int | list[int]]


class TokenPositionError(ValueError):
    """A token position does not exist in a prompt."""


class TokenPosition:
    """A named token position. ``indexer(setting) -> int | list[int]`` (unpadded indices, negative = from the end).

    ``counterfactual_indexer`` (optional) locates the source tokens on the counterfactual side when
    they sit elsewhere than on the base side; by default both sides use ``indexer``.
    """

    def __init__(
        self,
        indexer: Indexer,
        pipeline: LMPipeline,
        id: str,
        counterfactual_indexer: Indexer | None = None,
    ):
        if not isinstance(id, str) or not id:
            raise ValueError(f"a token position needs a non-empty string id, got {id!r}")
        for name, fn in (("indexer", indexer), ("counterfactual_indexer", counterfactual_indexer)):
            if fn is not None and not callable(fn):
                raise TypeError(f"the {name} of token position {id!r} must be callable, got {type(fn).__name__}")
        if indexer is None:
            raise TypeError(f"token position {id!r} needs an indexer")
        self.indexer = indexer
        self.counterfactual_indexer = counterfactual_indexer
        self.pipeline = pipeline
        self.id = id

    def _resolve(self, indexer: Indexer, setting: dict[str, Any]) -> list[int]:
        length = len(self.pipeline.tokenize_one(setting)["input_ids"])
        indices = self._as_indices(indexer(setting), setting)
        if not indices:
            raise TokenPositionError(f"token position {self.id!r} selects no token in {setting.get('raw_input')!r}")
        out = []
        for i in indices:
            j = i + length if i < 0 else i
            if not 0 <= j < length:
                raise TokenPositionError(
                    f"token position {self.id!r} points at index {i} but the prompt "
                    f"{setting.get('raw_input')!r} has {length} tokens"
                )
            out.append(j)
        return out

    def _as_indices(self, raw: Any, setting: dict[str, Any]) -> list[int]:
        """An indexer's answer as a list of ints; anything else (None, floats, nested lists, bools) is refused."""
        def is_int(x: Any) -> bool:
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        if is_int(raw):
            return [int(raw)]
        if isinstance(raw, (list, tuple)) and all(is_int(i) for i in raw):
            return [int(i) for i in raw]
        shown = repr(raw) if len(repr(raw)) <= 60 else repr(raw)[:57] + "..."
        raise TokenPositionError(
            f"the indexer of token position {self.id!r} must return an int or a list of ints, got "
            f"{type(raw).__name__} {shown} for {setting.get('raw_input')!r}"
        )

    def index(self, setting: dict[str, Any]) -> list[int]:
        """Base-side token indices (non-negative, validated)."""
        return self._resolve(self.indexer, setting)

    def counterfactual_index(self, setting: dict[str, Any]) -> list[int]:
        """Source-side token indices on a counterfactual input."""
        return self._resolve(self.counterfactual_indexer or self.indexer, setting)

    def highlight(self, setting: dict[str, Any]) -> str:
        """The prompt's tokens with the selected ones in brackets (for eyeballing positions)."""
        enc = self.pipeline.tokenize_one(setting)
        chosen = set(self.index(setting))
        toks = self.pipeline.tokenizer.convert_ids_to_tokens(enc["input_ids"])
        return " ".join(f"[{t}]" if i in chosen else t for i, t in enumerate(toks))

    def __repr__(self) -> str:
        return f"TokenPosition({self.id!r})"


def joint_position(positions: Sequence[TokenPosition]) -> TokenPosition:
    """Several positions as one unit (id ``a+b``): their tokens in this order, on both sides. A featurizer
    trained on the joint unit (`experiments.featurizers.das.JointResidualCell`) acts on their vectors
    concatenated."""
    positions = list(positions)
    if len(positions) < 2 or len({p.id for p in positions}) != len(positions):
        raise ValueError(f"a joint position needs at least two distinct positions, got {[p.id for p in positions]}")
    pipelines = {id(p.pipeline) for p in positions}
    if len(pipelines) != 1:
        raise ValueError("the positions of a joint position must belong to one pipeline")
    return TokenPosition(lambda setting: [i for p in positions for i in p.index(setting)], positions[0].pipeline,
                         id="+".join(p.id for p in positions),
                         counterfactual_indexer=lambda setting: [i for p in positions
                                                                 for i in p.counterfactual_index(setting)])


def last_token_position(pipeline: LMPipeline, id: str = "last") -> TokenPosition:
    """The final prompt token (where the answer is read)."""
    return TokenPosition(lambda setting: [-1], pipeline, id=id)


def char_span_token_indices(pipeline: LMPipeline, prompt: str | dict[str, Any], start: int, end: int) -> list[int]:
    """Indices of the tokens overlapping characters [start, end) of the raw prompt (before any chat
    template; the template's shift is accounted for)."""
    raw = prompt["raw_input"] if isinstance(prompt, dict) else prompt
    enc = pipeline.tokenize_one(prompt)
    shift = enc["text"].find(raw)
    if shift < 0:
        raise TokenPositionError(f"raw prompt {raw!r} not found in the tokenised text {enc['text']!r}")
    lo, hi = start + shift, end + shift
    hits = [i for i, (s, e) in enumerate(enc["offsets"]) if e > s and s < hi and e > lo]
    if not hits:
        raise TokenPositionError(f"no token covers characters {start}..{end} of {raw!r}")
    return hits


def substring_token_indices(pipeline: LMPipeline, prompt: str | dict[str, Any], substring: str, occurrence: int = 0) -> list[int]:
    """Indices of the tokens overlapping ``substring`` (its ``occurrence``-th match in the raw prompt)."""
    raw = prompt["raw_input"] if isinstance(prompt, dict) else prompt
    start = -1
    for _ in range(occurrence + 1):
        start = raw.find(substring, start + 1)
        if start < 0:
            raise TokenPositionError(f"substring {substring!r} (occurrence {occurrence}) not found in {raw!r}")
    return char_span_token_indices(pipeline, prompt, start, start + len(substring))


def substring_position(
    pipeline: LMPipeline,
    substring_of: Callable[[dict[str, Any]], str],
    id: str,
    occurrence: int = 0,
    pick: str = "all",
) -> TokenPosition:
    """Tokens covering ``substring_of(setting)`` in the prompt. ``pick``: "all", "first" or "last" of them."""
    if pick not in ("all", "first", "last"):
        raise ValueError(f"pick must be 'all', 'first' or 'last', got {pick!r}")

    def indexer(setting: dict[str, Any]) -> list[int]:
        hits = substring_token_indices(pipeline, setting, substring_of(setting), occurrence)
        return hits if pick == "all" else [hits[0] if pick == "first" else hits[-1]]

    return TokenPosition(indexer, pipeline, id=id)
