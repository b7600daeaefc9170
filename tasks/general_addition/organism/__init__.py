"""Addition model organism: a small Llama trained from scratch on 2- and 3-digit addition.

Prompts look like ``"58+67="`` (both addends zero-padded to the same width, 2 or 3 digits);
the answer is ``str(int(a) + int(b))`` followed by EOS. The checkpoint in :data:`ORGANISM_DIR`
is produced by ``python -m tasks.general_addition.organism.train_organism``.

Two *planted* organisms, fine-tuned from it by interchange intervention training, hold ``carry_0`` in a
known 2-d subspace of the residual stream after layer 0 at the ``digit_1_0`` token:
:data:`PLANTED_ALIGNED_DIR` (residual dimensions 0 and 1) and :data:`PLANTED_ROTATED_DIR` (a seeded random
2-d subspace). Each folder has a ``planted.json`` read by :func:`load_planted_spec`; both are produced by
``python -m tasks.general_addition.organism.train_planted``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, model_validator
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:
    import torch

ORGANISM_DIR: Path = Path(__file__).resolve().parent / "addition-llama"
PLANTED_ALIGNED_DIR: Path = Path(__file__).resolve().parent / "planted-aligned"
PLANTED_ROTATED_DIR: Path = Path(__file__).resolve().parent / "planted-rotated"
PLANTED_SPEC_FILE = "planted.json"

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


class PlantedSpec(BaseModel):
    """Where a planted organism holds its variable: the span of ``basis`` (k orthonormal rows of length d) in
    the ``component`` of decoder layer ``layer`` at token position ``position`` (an id of the task's positions)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    variable: str
    layer: int
    component: Literal["block_output"]
    position: str
    basis: list[list[float]]
    basis_kind: Literal["aligned", "rotated"]
    seed: int

    @model_validator(mode="after")
    def _rectangular(self) -> "PlantedSpec":
        if not self.basis or len({len(row) for row in self.basis}) != 1 or len(self.basis) > len(self.basis[0]):
            raise ValueError("basis must be k rows of the same length d, with 1 <= k <= d")
        return self

    @property
    def k(self) -> int:
        """Dimension of the planted subspace."""
        return len(self.basis)

    @property
    def d(self) -> int:
        """Width of the residual stream."""
        return len(self.basis[0])

    def basis_matrix(self, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """The basis as a (d, k) tensor with orthonormal columns (float32 unless ``dtype``)."""
        import torch

        return torch.tensor(self.basis, dtype=dtype or torch.float32).T.contiguous()


def load_planted_spec(path: str | Path) -> PlantedSpec:
    """The planted spec of an organism folder (its ``planted.json``) or of a ``planted.json`` file."""
    path = Path(path)
    if path.is_dir():
        path = path / PLANTED_SPEC_FILE
    return PlantedSpec.model_validate(json.loads(path.read_text()))
