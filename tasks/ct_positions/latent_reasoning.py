"""Continuous-thought (latent reasoning) decoding for HF causal LMs, with edits at thought positions.

Layout of one run (cache coordinates, as :mod:`experiments.backends.attention_control` counts them): the
left-padded prompt ``question + bot_ids`` fills columns ``0 .. T-1``; thought ``CT_j`` is fed at
``T + j`` (j = 0 .. k-1) as ``inputs_embeds = projection(h)``, where ``h`` is the last-layer hidden
state of the previous position (the bot token for CT0); then ``eot_ids`` are fed, and the answer is
decoded greedily, each generated token fed back at the next coordinate. The last thought's own
output is computed but, as in the reference implementation, never fed.

``ThoughtEdit`` changes a thought in flight: the fed-back embedding (``site="embedding"``), the
last-layer hidden state it was made from (``site="hidden"``, before the projection, i.e. what
CT_{j+1} receives), or a decoder block's output at CT_j (``site="residual"``, one layer or all).
Modes: ``zero``, ``mean`` / ``patch`` (with ``value``). Attention ops (e.g. ``BlockAttention`` on a CT
coordinate) apply in the prompt pass, every latent step and every decoding step.

``attention_mask_in_latent=False`` reproduces the reference code: the latent, eot and decoding
steps pass no attention mask and no position ids (left padding is then visible to them, and
positions count padded columns); True masks padding and counts positions from the first real
token, so batched runs equal single runs.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from experiments.backends.architectures import family_of, get_module
from experiments.backends.attention_control import AttentionOp, BlockAttention
from experiments.backends import backend_with
from experiments.backends.sites import Site as BackendSite
from experiments.backends.sites import SiteEdit
from experiments.backends.transformers_adapter import output_cache, with_cache

Site = Literal["embedding", "hidden", "residual"]
Mode = Literal["zero", "mean", "patch"]
_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in ``text`` (commas dropped, trailing ``.0`` dropped); None if there is none."""
    hits = _LAST_NUMBER.findall(text)
    if not hits:
        return None
    raw = hits[-1].replace(",", "")
    try:
        value = float(raw)
    except ValueError:  # pragma: no cover - the regex only matches numbers
        return None
    return str(int(value)) if value == int(value) else raw


class CODIProjection(nn.Sequential):
    """The reference projection: Dropout -> Linear(d, p) -> GELU -> Linear(p, d) -> LayerNorm ``ln``.
    State-dict keys ``1.*``, ``3.*``, ``ln.*`` (``prj.`` prefixed inside a checkpoint)."""

    def __init__(self, hidden_size: int, projection_size: int, dropout: float = 0.0):
        super().__init__(OrderedDict([
            ("0", nn.Dropout(dropout)),
            ("1", nn.Linear(hidden_size, projection_size)),
            ("2", nn.GELU()),
            ("3", nn.Linear(projection_size, hidden_size)),
            ("ln", nn.LayerNorm(hidden_size)),
        ]))


class LatentConfig(BaseModel):
    """How a latent-reasoning model is run. Token ids are raw ids of the model's vocabulary."""

    model_config = ConfigDict(extra="forbid")
    num_thoughts: int = Field(6, ge=0)
    bot_ids: list[int] = Field(default_factory=list, description="appended to every question")
    eot_ids: list[int] = Field(default_factory=list, description="fed after the last thought")
    max_new_tokens: int = Field(16, gt=0)
    stop_ids: list[int] = Field(default_factory=list, description="decoding stops at these (e.g. EOS)")
    pad_id: int | None = Field(None, description="id written into padding columns (default: tokenizer pad, else 0)")
    attention_mask_in_latent: bool = True
    answer_vocab_limit: int | None = Field(None, description="argmax over logits[:limit] only")
    add_special_tokens: bool = True


@dataclass(frozen=True)
class ThoughtEdit:
    """Change thought ``thought`` in flight (see module doc). ``value``: (d,) or (B, d) for one
    layer/site, (L, d) or (B, L, d) for ``site="residual"`` with ``layer=None`` (all blocks)."""

    thought: int
    site: Site = "embedding"
    mode: Mode = "zero"
    value: torch.Tensor | None = None
    layer: int | None = None
    rows: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.site not in ("embedding", "hidden", "residual"):
            raise ValueError(f"site must be embedding, hidden or residual, got {self.site!r}")
        if self.mode not in ("zero", "mean", "patch"):
            raise ValueError(f"mode must be zero, mean or patch, got {self.mode!r}")
        if self.mode != "zero" and self.value is None:
            raise ValueError(f"mode {self.mode!r} needs a value")
        if self.site != "residual" and self.layer is not None:
            raise ValueError("layer is only meaningful for site='residual'")

    def apply(self, state: torch.Tensor, layer_index: int | None = None) -> torch.Tensor:
        """``state`` (B, d) -> edited copy."""
        out = state.clone()
        rows = torch.arange(state.shape[0]) if self.rows is None else torch.as_tensor(list(self.rows))
        if self.mode == "zero":
            out[rows] = 0
            return out
        value = self.value.to(state.device, state.dtype)
        if self.site == "residual" and self.layer is None:
            value = value[..., layer_index, :]
        if value.ndim == 1:
            value = value.expand(len(rows), -1)
        elif value.shape[0] == state.shape[0] and self.rows is not None:
            value = value[rows]
        if value.shape != (len(rows), state.shape[1]):
            raise ValueError(
                f"ThoughtEdit value has shape {tuple(value.shape)}; expected ({len(rows)}, {state.shape[1]})")
        out[rows] = value
        return out


@dataclass
class Layout:
    """Cache coordinates of one batch: ``width`` prompt columns; per row the question columns
    (``question[b]``), the bot columns; the thought, eot and answer coordinates (shared by rows)."""

    width: int
    pad_offsets: list[int]
    question_lengths: list[int]
    n_bot: int
    num_thoughts: int
    n_eot: int
    n_answer: int = 0

    def question(self, row: int) -> list[int]:
        start = self.pad_offsets[row]
        return list(range(start, start + self.question_lengths[row]))

    @property
    def bot(self) -> list[int]:
        return list(range(self.width - self.n_bot, self.width))

    def ct(self, j: int) -> int:
        if not 0 <= j < self.num_thoughts:
            raise IndexError(f"thought {j} out of range (k = {self.num_thoughts})")
        return self.width + j

    @property
    def cts(self) -> list[int]:
        return [self.width + j for j in range(self.num_thoughts)]

    @property
    def eot(self) -> list[int]:
        start = self.width + self.num_thoughts
        return list(range(start, start + self.n_eot))

    @property
    def answer(self) -> list[int]:
        """Coordinates at which generated answer tokens are fed (all but the last generated token)."""
        start = self.width + self.num_thoughts + self.n_eot
        return list(range(start, start + max(self.n_answer - 1, 0)))


@dataclass
class LatentRun:
    """Output of :meth:`LatentReasoner.run`. Tensors on CPU, float32."""

    texts: list[str]
    answers: list[str | None]
    token_ids: list[list[int]]
    layout: Layout
    thought_inputs: torch.Tensor  # (B, k, d): embeddings fed at CT_j
    thought_hidden: torch.Tensor  # (B, k, d): last-layer hidden state at CT_j (before the projection)
    thought_residual: torch.Tensor | None = None  # (B, k, L, d): block outputs at CT_j, when captured
    thought_top_tokens: list[list[int]] = field(default_factory=list)  # argmax of the LM head per thought
    attention_records: list[Any] = field(default_factory=list)


def block_positions(positions: Sequence[int], layers: Sequence[int] | None = None,
                    heads: Sequence[int] | None = None) -> BlockAttention:
    """Block every later query (prompt, thoughts, eot, every answer token) from the keys at ``positions``."""
    return BlockAttention(key_positions=[list(positions)], layers=layers, heads=heads, coordinates="cache")


def block_thoughts(thoughts: Sequence[int], layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None) -> Callable[[Layout], list[AttentionOp]]:
    """Attention-op factory for :meth:`LatentReasoner.run`: block CT_j for j in ``thoughts``."""

    def make(layout: Layout) -> list[AttentionOp]:
        return [block_positions([layout.ct(j) for j in thoughts], layers, heads)]

    return make


class LatentReasoner:
    """Batched continuous-thought decoding for ``model`` (any HF causal LM) with ``projection``
    (None: the hidden state is fed back unchanged)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: LatentConfig,
                 projection: nn.Module | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.projection = projection.eval() if projection is not None else None
        self.device = next(model.parameters()).device
        self.blocks = get_module(model, family_of(model).layers)
        pad = config.pad_id if config.pad_id is not None else tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    # ------------------------------------------------------------------ batching
    def prepare(self, questions: Sequence[str]) -> tuple[dict[str, torch.Tensor], Layout]:
        """Tokenise, append ``bot_ids``, left-pad. Returns model inputs and the layout."""
        if not questions:
            raise ValueError("no questions given")
        special = self.config.add_special_tokens
        rows = [list(self.tokenizer(q, add_special_tokens=special)["input_ids"]) for q in questions]
        full = [r + list(self.config.bot_ids) for r in rows]
        width = max(len(r) for r in full)
        ids = torch.full((len(full), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(full), width), dtype=torch.long)
        for b, r in enumerate(full):
            ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r):] = 1
        layout = Layout(width, [width - len(r) for r in full], [len(r) for r in rows], len(self.config.bot_ids),
                        self.config.num_thoughts, len(self.config.eot_ids))
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}, layout

    # ------------------------------------------------------------------ site edits
    @contextmanager
    def _residual_edits(self, state: dict[str, Any], edits: Sequence[ThoughtEdit], capture: bool) -> Iterator[None]:
        """Backend site edits of every block's output: capture / edit it at the current thought step."""

        def edit_at(layer: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
            def fn(hidden: torch.Tensor) -> torch.Tensor | None:
                j = state.get("thought")
                if j is None:
                    return None
                last = hidden[:, -1]
                changed = False
                for edit in edits:
                    if edit.site == "residual" and edit.thought == j and edit.layer in (None, layer):
                        last = edit.apply(last, layer)
                        changed = True
                if capture:
                    state["residual"][j][layer] = last.detach().float().cpu()
                if not changed:
                    return None
                hidden = hidden.clone()
                hidden[:, -1] = last
                return hidden
            return fn

        active = capture or any(e.site == "residual" for e in edits)
        site_edits = [SiteEdit(BackendSite(layer, "block_output"), edit_at(layer)) for layer in range(len(self.blocks))]
        with backend_with("edits", self.model).edits(site_edits if active else []):
            yield

    # ------------------------------------------------------------------ run
    @torch.no_grad()
    def run(
        self,
        questions: Sequence[str],
        edits: Sequence[ThoughtEdit] = (),
        attention_ops: Sequence[AttentionOp] | Callable[[Layout], Sequence[AttentionOp]] = (),
        capture_residual: bool = False,
        num_thoughts: int | None = None,
    ) -> LatentRun:
        """Decode ``questions`` with continuous thoughts; ``edits`` and ``attention_ops`` intervene."""
        cfg = self.config
        k = cfg.num_thoughts if num_thoughts is None else num_thoughts
        for e in edits:
            if not 0 <= e.thought < k:
                raise ValueError(f"edit on thought {e.thought} but the run has {k} thoughts")
            if e.site == "residual" and e.layer is not None and not 0 <= e.layer < self.num_layers:
                raise ValueError(f"edit on layer {e.layer}; the model has {self.num_layers} blocks")
        inputs, layout = self.prepare(questions)
        layout.num_thoughts = k
        ops = list(attention_ops(layout) if callable(attention_ops) else attention_ops)
        state: dict[str, Any] = {"thought": None, "residual": [[None] * self.num_layers for _ in range(k)]}
        with ExitStack() as stack:
            controller = stack.enter_context(backend_with("attention", self.model).attention(ops)) if ops else None
            stack.enter_context(self._residual_edits(state, edits, capture_residual))
            run = self._decode(inputs, layout, k, edits, state)
        if controller is not None:
            run.attention_records = controller.records
        if capture_residual and k:
            run.thought_residual = torch.stack([torch.stack(state["residual"][j], 1) for j in range(k)], 1)
        return run

    def _forward(self, mask: torch.Tensor | None, positions: torch.Tensor | None, cache: Any, **kwargs: Any) -> Any:
        masked = self.config.attention_mask_in_latent
        return self.model(**with_cache(self.model, {"attention_mask": mask if masked else None,
                                                    "position_ids": positions if masked else None,
                                                    "use_cache": True, **kwargs}, cache))

    def _decode(self, inputs: dict[str, torch.Tensor], layout: Layout, k: int, edits: Sequence[ThoughtEdit],
                state: dict[str, Any]) -> LatentRun:
        cfg = self.config
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prompt_kwargs: dict[str, Any] = {"input_ids": inputs["input_ids"], "attention_mask": mask}
        if cfg.attention_mask_in_latent:
            prompt_kwargs["position_ids"] = positions
        out = self.model(**prompt_kwargs, use_cache=True, output_hidden_states=True)
        cache = output_cache(out)
        hidden = out.hidden_states[-1][:, -1]
        last_pos = positions[:, -1:]
        bsz = mask.shape[0]
        embed = self.model.get_input_embeddings()
        inputs_list, hidden_list, top_tokens = [], [], []

        def step_mask(n: int) -> torch.Tensor:
            return torch.cat([mask, torch.ones(bsz, n, dtype=mask.dtype, device=mask.device)], dim=-1)

        fed = 0
        for j in range(k):
            for e in edits:
                if e.thought == j - 1 and e.site == "hidden":
                    hidden = e.apply(hidden)
            emb = self.projection(hidden) if self.projection is not None else hidden
            for e in edits:
                if e.thought == j and e.site == "embedding":
                    emb = e.apply(emb)
            inputs_list.append(emb.detach().float().cpu())
            fed += 1
            state["thought"] = j
            out = self._forward(step_mask(fed), last_pos + fed, cache,
                                inputs_embeds=emb[:, None].to(embed.weight.dtype), output_hidden_states=True)
            state["thought"] = None
            cache = output_cache(out)
            hidden = out.hidden_states[-1][:, -1]
            hidden_list.append(hidden.detach().float().cpu())
            top_tokens.append(out.logits[:, -1].argmax(-1).tolist())
        # eot, then greedy answer
        logits = out.logits[:, -1]
        if cfg.eot_ids:
            n = len(cfg.eot_ids)
            eot = torch.tensor(cfg.eot_ids, device=self.device)[None].expand(bsz, -1)
            pos = last_pos + fed + torch.arange(1, n + 1, device=self.device)[None]
            fed += n
            out = self._forward(step_mask(fed), pos, cache, inputs_embeds=embed(eot))
            cache = output_cache(out)
            logits = out.logits[:, -1]
        elif k:
            raise ValueError("thoughts need eot_ids to mark the start of the answer")
        generated: list[list[int]] = [[] for _ in range(bsz)]
        finished = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        stops = torch.tensor(cfg.stop_ids or [-1], device=self.device)
        for step in range(cfg.max_new_tokens):
            scores = logits.float()
            if cfg.answer_vocab_limit is not None:
                scores = scores[:, : cfg.answer_vocab_limit]
            nxt = scores.argmax(-1)
            for b in (~finished).nonzero().flatten().tolist():
                generated[b].append(int(nxt[b]))
            finished = finished | torch.isin(nxt, stops)
            if bool(finished.all()) or step == cfg.max_new_tokens - 1:
                break
            fed += 1
            nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
            out = self._forward(step_mask(fed), last_pos + fed, cache, input_ids=nxt[:, None])
            cache = output_cache(out)
            logits = out.logits[:, -1]
        layout.n_answer = max(len(g) for g in generated)
        texts = [self.tokenizer.decode([t for t in g if t not in cfg.stop_ids], skip_special_tokens=True)
                 for g in generated]
        d = hidden.shape[-1]
        empty = torch.zeros(bsz, 0, d)
        return LatentRun(
            texts=texts,
            answers=[last_number(t) for t in texts],
            token_ids=generated,
            layout=layout,
            thought_inputs=torch.stack(inputs_list, 1) if k else empty,
            thought_hidden=torch.stack(hidden_list, 1) if k else empty,
            thought_top_tokens=[list(r) for r in zip(*top_tokens)] if k else [[] for _ in range(bsz)],
        )

    def run_batched(self, questions: Sequence[str], batch_size: int = 64, progress: bool = False,
                    **kwargs: Any) -> list[LatentRun]:
        """:meth:`run` over ``questions`` in chunks (per-row ``value`` tensors of edits are not split: use
        :meth:`run` per chunk for per-row patches)."""
        from tqdm import tqdm

        starts = range(0, len(questions), batch_size)
        return [self.run(questions[s:s + batch_size], **kwargs)
                for s in tqdm(starts, disable=not progress, desc="latent runs", mininterval=2.0)]


# ---------------------------------------------------------------------------- explicit chain of thought
@dataclass
class CoTRun:
    """Explicit chain of thought: ``thought_spans[b]`` = cache coordinates of each thought's tokens."""

    texts: list[str]
    answers: list[str | None]
    thought_spans: list[list[list[int]]]
    prompt_width: int


class ExplicitCoTRunner:
    """Chain-of-thought models whose thoughts are tokens, behind the same questions -> answers call.

    The model generates thoughts separated by ``separator`` and then ``answer_marker`` and the
    answer. Intervening on thought j (``run(..., block=[j])``) re-runs the answer stage on the
    baseline's own thoughts (question + thoughts as the prompt) with attention from every later
    position to thought j's tokens blocked, so the thought texts stay those of the baseline.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, separator: str = "\n",
                 answer_marker: str = "####", max_new_tokens: int = 128, stop_ids: Sequence[int] = ()):
        self.inner = LatentReasoner(model, tokenizer, LatentConfig(num_thoughts=0, max_new_tokens=max_new_tokens,
                                                                   stop_ids=list(stop_ids)))
        self.tokenizer = tokenizer
        self.separator = separator
        self.answer_marker = answer_marker

    def _spans(self, question: str, text: str, width: int) -> list[list[int]]:
        """Coordinates of each thought, found by re-tokenising question+thought prefixes."""
        body = text.split(self.answer_marker, 1)[0]
        base = len(self.tokenizer(question, add_special_tokens=True)["input_ids"])
        spans, consumed = [], ""
        for part in [p for p in body.split(self.separator)]:
            before = len(self.tokenizer(question + consumed, add_special_tokens=True)["input_ids"])
            consumed += part + self.separator
            after = len(self.tokenizer(question + consumed, add_special_tokens=True)["input_ids"])
            if part.strip():
                spans.append([width + (before - base) + i for i in range(after - before)])
        return spans

    def run(self, questions: Sequence[str], block: Sequence[int] = ()) -> CoTRun:
        base = self.inner.run(questions)
        width = base.layout.width
        spans = [self._spans(q, t, width) for q, t in zip(questions, base.texts)]
        if not block:
            answers = [last_number(t.split(self.answer_marker, 1)[-1]) for t in base.texts]
            return CoTRun(base.texts, answers, spans, width)
        texts, answers = [], []
        for b, (q, t) in enumerate(zip(questions, base.texts)):
            prefix = q + t.split(self.answer_marker, 1)[0] + self.answer_marker
            inputs, layout = self.inner.prepare([prefix])
            q_len = len(self.tokenizer(q, add_special_tokens=True)["input_ids"])
            keys = [layout.pad_offsets[0] + q_len + (c - width) for j in block if j < len(spans[b]) for c in spans[b][j]]
            ops = [block_positions(keys)] if keys else []
            run = self.inner.run([prefix], attention_ops=ops)
            texts.append(run.texts[0])
            answers.append(last_number(run.texts[0]))
        return CoTRun(texts, answers, spans, width)
