"""`LMPipeline`: a HF causal LM + tokenizer with batched left-padded prompts and greedy decoding.

Everything network-side goes through one pipeline: tokenisation (``load``), greedy
generation of whole multi-token answers (``generate``), decoding (``dump``), and the
architecture facts experiments need (``num_layers``, ``num_heads``, ``hidden_size``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import huggingface_hub
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from experiments.backends import PromptPass
from experiments.model_identity import weight_files
from experiments.top_k import top_k
from experiments.backends.attention_control import register_attention
from experiments.backends.transformers_adapter import attention_implementation, with_cache

PromptLike = str | dict[str, Any]

#: Config attributes of final-logit transforms other than Gemma's softcapping (Cohere ``logit_scale``,
#: Granite ``logits_scaling`` …): models that set one are run through their own forward for logits.
OTHER_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier_scale",
                          "mup_width_multiplier", "scale_width", "dim_model_base", "width_multiplier",
                          "logits_scale", "output_logits_scale")


class ModelLoadError(ValueError):
    """The model name or folder could not be loaded."""


class PromptError(ValueError):
    """A prompt the model cannot take: empty, or longer than the model's maximum positions."""


@dataclass
class PromptBatch:
    """A tokenised, left-padded batch. ``input_ids``/``attention_mask``/``position_ids``: (B, T).

    ``lengths[b]`` is the unpadded length of row b; token index i of the unpadded prompt lives at
    column ``pad_offsets[b] + i``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: list[int]
    pad_offsets: list[int]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Kwargs for the model forward (``input_ids`` first: pyvene reads the batch size from it)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def cache_columns(self, token_indices: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, n) cache columns of per-row token indices of the unpadded prompts (negative: from the end), -1
        padding the shorter rows: the positions the attention operations take (``attention_control``).
        An index outside its prompt is an error naming the row."""
        if len(token_indices) != len(self.lengths):
            raise ValueError(f"{len(token_indices)} rows of token indices for a batch of {len(self.lengths)}")
        rows = []
        for b, indices in enumerate(token_indices):
            row = []
            for i in indices:
                j = int(i) + self.lengths[b] if int(i) < 0 else int(i)
                if not 0 <= j < self.lengths[b]:
                    raise ValueError(f"token index {i} is outside row {b}'s prompt of {self.lengths[b]} tokens")
                row.append(self.pad_offsets[b] + j)
            rows.append(row)
        width = max((len(r) for r in rows), default=0)
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long,
                            device=self.input_ids.device).reshape(len(rows), width)

    def select(self, rows: torch.Tensor | Sequence[int]) -> "PromptBatch":
        index = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        idx = index.tolist()
        return PromptBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.position_ids[index],
            [self.lengths[i] for i in idx],
            [self.pad_offsets[i] for i in idx],
        )


@dataclass
class GenerationOutput:
    """Greedy continuation of a batch. ``token_ids``: (B, S) with ``pad`` after EOS; ``topk_*``: (B, S, k)."""

    token_ids: torch.Tensor
    lengths: list[int]
    topk_token_ids: torch.Tensor
    topk_logits: torch.Tensor


def _weight_files(source: str, local: bool) -> list[Path] | None:
    """The weight files a checkpoint was loaded from (a local folder, or the hub snapshot in the local cache);
    None when they cannot be found (the identity then hashes the tensors)."""
    try:
        folder = Path(source) if local else Path(huggingface_hub.snapshot_download(source, local_files_only=True))
        found = weight_files(folder)
    except Exception:  # not in the cache in snapshot form, or unreadable: fall back to the tensors
        return None
    return found or None


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" picks cuda when available; asking for cuda on a machine without it is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return device


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


HUB_PROBE_TIMEOUT_S = 10.0
#: logits elements projected at once by ``LMPipeline.project_top_k``: (CPU, CUDA); 2**23 float32 = 32 MiB
PROJECTION_CHUNK_ELEMENTS = (2**23, 2**27)


def _hub_offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return huggingface_hub.is_offline_mode() or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_cache_only(name: str) -> bool:
    """Whether a hub name must be loaded from the local cache; refuses at once a name that is neither.

    One metadata request (``HUB_PROBE_TIMEOUT_S``) tells a missing repo or an unreachable hub apart before
    ``from_pretrained`` would spend a minute retrying downloads. Offline (``HF_HUB_OFFLINE``) or
    unreachable, a name already in the hub cache is loaded from there.
    """
    try:
        cached = isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError:
        raise ModelLoadError(f"model {name!r} is neither a local folder nor a valid hub name") from None
    if _hub_offline():
        if not cached:
            raise ModelLoadError(f"model {name!r} is neither a local folder nor in the hub cache, "
                                 "and HF_HUB_OFFLINE is set")
        return True
    try:
        huggingface_hub.model_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return False  # exists; from_pretrained reports whether this token has access
    except RepositoryNotFoundError:
        if cached:
            return True
        raise ModelLoadError(f"model {name!r} is neither a local folder nor a model on the hub "
                             "(if it is private or gated, log in with `hf auth login`)") from None
    except HfHubHTTPError:
        return False  # the hub answered with some other error: let from_pretrained try and report it
    except HFValidationError:
        raise ModelLoadError(f"model {name!r} is neither a local folder nor a valid hub name") from None
    except Exception as exc:  # noqa: BLE001 -- connection refused, DNS failure, timeout: the hub is out of reach
        if cached:
            return True
        raise ModelLoadError(f"model {name!r} is neither a local folder nor reachable: the hub did not answer "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
    return False


class LMPipeline:
    """A causal LM ready for interventions.

    ``model_or_name``: a hub name, a local folder in HF format, or a loaded ``PreTrainedModel``
    (then pass ``tokenizer``). Prompts are left-padded; answers are generated greedily for up to
    ``max_new_tokens`` tokens and stop at EOS.
    """

    def __init__(
        self,
        model_or_name: str | os.PathLike[str] | PreTrainedModel,
        max_new_tokens: int = 3,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        use_chat_template: bool = False,
        tokenizer: PreTrainedTokenizerBase | None = None,
        top_k: int = 5,
    ):
        for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.device = resolve_device(device)
        self.max_new_tokens = max_new_tokens
        self.use_chat_template = use_chat_template
        self.top_k = top_k
        if isinstance(model_or_name, PreTrainedModel):
            if tokenizer is None:
                raise ValueError("pass tokenizer= together with an already loaded model")
            self.model = model_or_name.to(self.device, _resolve_dtype(dtype))
            self.tokenizer = tokenizer
            self.weight_files: list[Path] | None = None  # an object: its identity is its tensors' content
            self.name = str(getattr(model_or_name.config, "_name_or_path", "") or type(model_or_name).__name__)
        else:
            self.name = str(model_or_name)
            self.model, self.tokenizer = self._load(self.name, _resolve_dtype(dtype))
        self.model.eval().requires_grad_(False)  # fixed once: kernels must not depend on when pyvene wraps it
        if (self.model.dtype == torch.float64 and attention_implementation(self.model) == "eager"
                and self.model.config.model_type != "gpt2"):
            # transformers' eager attention softmaxes float64 logits in float32: the float64 mask minimum becomes
            # -inf, left-padding rows turn NaN and spread to real rows. The controlled eager attention (no ops) is
            # the same maths with a float64 softmax.
            self.model.set_attn_implementation(register_attention())
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.config = self.model.config
        self.projects_last_only = self._head_is_plain()

    def _head_is_plain(self) -> bool:
        """True when logits = head(final hidden) [softcapped as Gemma 2]: the base model runs without the
        vocabulary projection and only read positions are projected (``project``)."""
        model = self.model
        if model.base_model is model or model.get_output_embeddings() is None:
            return False
        return all(getattr(self.config, name, None) in (None, 1, 1.0) for name in OTHER_LOGIT_TRANSFORMS)

    @property
    def body(self) -> torch.nn.Module:
        """The module a prompt or decoding forward calls: the base model (no vocabulary projection) when the
        head can be applied separately (``projects_last_only``), else the full model with ``logits_to_keep``."""
        return self.model.base_model if self.projects_last_only else self.model

    def forward_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` plus ``logits_to_keep=1`` when ``body`` is the full model."""
        return inputs if self.projects_last_only else {**inputs, "logits_to_keep": 1}

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) float32 of final hidden states (..., d) (after the final norm): the output head on a
        contiguous copy, then Gemma 2's ``final_logit_softcapping`` when set."""
        logits = self.model.get_output_embeddings()(hidden.contiguous())
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def project_top_k(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (R, k) float32 logits and token ids of final hidden states (R, d), ties to the lower id.

        Projects ``PROJECTION_CHUNK_ELEMENTS // V`` rows at a time (the logits of a chunk stay in cache on
        CPU; on a GPU they bound the float32 logits held at once) and never keeps all R × V logits."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        k = min(k, vocab)
        budget = PROJECTION_CHUNK_ELEMENTS[hidden.device.type == "cuda"]
        step = max(1, budget // vocab)
        values, ids = [], []
        for start in range(0, hidden.shape[0], step):
            v, i = top_k(self.project(hidden[start : start + step]), k)
            values.append(v)
            ids.append(i)
        if not values:
            empty = torch.empty(0, k, device=hidden.device)
            return empty, empty.long()
        return torch.cat(values), torch.cat(ids)

    def last_top_k(self, out: PromptPass, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (B, k) float32 logits and ids at the last position of a prompt pass: its ``last_hidden``
        (projected by ``project_top_k``, each row's state picked by ``rows``) or its ``last_logits``."""
        if out.last_hidden is not None:
            values, ids = self.project_top_k(out.last_hidden, k)
            return (values, ids) if out.rows is None else (values[out.rows], ids[out.rows])
        logits = out.last_logits
        return top_k(logits.float(), min(k, logits.shape[-1]))

    def _load(self, name: str, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        local = Path(name).expanduser()
        looks_local = local.exists() or name.startswith((".", "/", "~"))
        if looks_local and not (local / "config.json").exists():
            raise ModelLoadError(f"model folder {name!r} does not exist or has no config.json")
        source = str(local) if looks_local else name
        local_only = False if looks_local else _hub_cache_only(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            # on a GPU, load the weights straight onto it (an 8B model need not pass through CPU memory)
            placement = {"device_map": {"": str(self.device)}} if self.device.type == "cuda" else {}
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype if dtype is not None else "auto", local_files_only=local_only, **placement
            )
        except OSError as exc:
            raise ModelLoadError(f"could not load model {name!r}: {_first_line(exc)}") from exc
        self.weight_files = _weight_files(source, looks_local)
        return model.to(self.device), tokenizer

    # ------------------------------------------------------------------ architecture facts
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def max_positions(self) -> int | None:
        """Longest sequence (prompt + generated tokens) the model takes; None when the config sets no limit."""
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    # ------------------------------------------------------------------ text <-> tokens
    def prompt_text(self, prompt: PromptLike) -> str:
        """The exact string that is tokenised for a prompt (raw_input, chat template applied if asked)."""
        if isinstance(prompt, dict) and "raw_input" not in prompt:
            raise KeyError(f"a setting used as a prompt needs a 'raw_input' entry; it has {sorted(prompt)}")
        text = prompt["raw_input"] if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a string or a setting with 'raw_input', got {type(text).__name__}")
        if not text:
            raise PromptError(f"empty prompt{'' if isinstance(prompt, str) else f' in setting {prompt!r:.200}'}")
        if self.use_chat_template:
            if not getattr(self.tokenizer, "chat_template", None):
                raise PromptError(f"use_chat_template is set but the tokenizer of {self.name!r} has no chat template")
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def tokenize_one(self, prompt: PromptLike) -> dict[str, Any]:
        """Unpadded ids and character offsets of one prompt: {"input_ids": [...], "offsets": [(s, e), ...], "text": str}.

        Memoised per prompt text (a bounded cache): token positions ask for the same prompt once per
        position and side, so a part tokenises each prompt once. Treat the result as read-only.
        """
        text = self.prompt_text(prompt)
        cache = self.__dict__.setdefault("_tokenized", {})
        hit = cache.get(text)
        if hit is not None:
            return hit
        add_special = not self.use_chat_template
        enc = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        result = {"input_ids": list(enc["input_ids"]), "offsets": [tuple(o) for o in enc["offset_mapping"]], "text": text}
        if len(cache) >= 65536:
            cache.clear()
        cache[text] = result
        return result

    def load(self, prompts: Sequence[PromptLike]) -> PromptBatch:
        """Tokenise and left-pad a batch; position ids count real tokens from 0 (pads get 0)."""
        texts = [self.prompt_text(p) for p in prompts]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not self.use_chat_template)
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        lengths = attention_mask.sum(-1).tolist()
        self._check_lengths(texts, lengths, extra=0)
        width = input_ids.shape[1]
        return PromptBatch(input_ids, attention_mask, position_ids, lengths, [width - n for n in lengths])

    def check_prompts(
        self, prompts: Sequence[PromptLike], max_new_tokens: int | None = None, labels: Sequence[str] | None = None
    ) -> None:
        """Refuse, naming the first culprit (``labels[i]``, default "prompt #i"), a prompt that is empty or
        leaves no room for the answer (tokens + ``max_new_tokens`` - 1 beyond the model's maximum positions)."""
        labels = list(labels) if labels is not None else [f"prompt #{i}" for i in range(len(prompts))]
        texts = []
        for label, prompt in zip(labels, prompts):
            try:
                texts.append(self.prompt_text(prompt))
            except PromptError as exc:
                raise PromptError(f"{label}: {exc}") from None
        if not texts:
            return
        ids = self.tokenizer(texts, add_special_tokens=not self.use_chat_template)["input_ids"]
        steps = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        self._check_lengths(texts, [len(row) for row in ids], extra=steps - 1, labels=labels)

    def _check_lengths(
        self, texts: Sequence[str], lengths: Sequence[int], extra: int, labels: Sequence[str] | None = None
    ) -> None:
        """Each prompt has >= 1 token and ``length + extra`` fits the model's positions."""
        limit = self.max_positions
        for i, (text, n) in enumerate(zip(texts, lengths)):
            label = labels[i] if labels is not None else f"prompt #{i}"
            shown = repr(text) if len(text) <= 60 else repr(text[:57]) + "..."
            if n == 0:
                raise PromptError(f"{label} {shown} tokenises to no token")
            if limit is not None and n + extra > limit:
                need = f"; with {extra + 1} generated tokens it needs {n + extra} positions" if extra else ""
                raise PromptError(
                    f"{label} {shown} has {n} tokens{need} but {self.name!r} takes at most {limit} "
                    f"(config max_position_embeddings / n_positions)"
                )

    def dump(self, token_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Decode generated ids to strings (special tokens dropped)."""
        rows = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[PromptLike] | PromptBatch, max_new_tokens: int | None = None) -> GenerationOutput:
        """Greedy decoding of a batch, no intervention."""
        batch = prompts if isinstance(prompts, PromptBatch) else self.load(prompts)
        return self.greedy_decode(batch, lambda inputs: self.body(**inputs), max_new_tokens)

    @torch.no_grad()
    def greedy_decode(
        self,
        batch: PromptBatch,
        prompt_forward: Callable[[dict[str, Any]], Any],
        max_new_tokens: int | None = None,
    ) -> GenerationOutput:
        """Run ``prompt_forward`` on the prompt (it may be an intervened forward), then decode greedily.

        ``prompt_forward(inputs)`` gets inputs for ``self.body`` and returns a `PromptPass` (or the body's
        transformers output, read by `PromptPass.of`), with its cache when more than one step is asked. Only
        the last position is projected onto the vocabulary, in row chunks, and reduced to the top-k at once
        (ties to the lower id); later steps run the plain model on the cache, so an intervention touches the
        prompt pass only.
        """
        steps = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if steps < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {steps}")
        limit = self.max_positions
        longest = max(range(len(batch.lengths)), key=lambda b: batch.lengths[b], default=0)
        if limit is not None and batch.lengths and batch.lengths[longest] + steps - 1 > limit:
            raise PromptError(
                f"prompt #{longest} has {batch.lengths[longest]} tokens; with {steps} generated tokens it needs "
                f"{batch.lengths[longest] + steps - 1} positions but {self.name!r} takes at most {limit}"
            )
        inputs = self.forward_inputs({**batch.model_inputs(), "use_cache": steps > 1})
        k = self.top_k
        out = PromptPass.of(prompt_forward(inputs))
        vals, ids = self.last_top_k(out, k)
        cache = out.cache if steps > 1 else None
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        bsz = batch.input_ids.shape[0]
        finished = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        tokens, top_ids, top_vals = [], [], []
        mask = batch.attention_mask
        positions = batch.position_ids[:, -1:]
        lengths = [0] * bsz
        for step in range(steps):
            nxt = ids[:, 0]
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            for b in (~finished).nonzero().flatten().tolist():
                lengths[b] += 1
            tokens.append(nxt)
            top_ids.append(ids)
            top_vals.append(vals)
            if eos is not None:
                finished = finished | (nxt == eos)
            if step == steps - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions + 1
            out = PromptPass.of(self.body(**self.forward_inputs(with_cache(self.body, {
                "input_ids": nxt[:, None], "attention_mask": mask, "position_ids": positions, "use_cache": True,
            }, cache))))
            cache = out.cache
            vals, ids = self.last_top_k(out, k)
        return GenerationOutput(
            torch.stack(tokens, dim=1), lengths, torch.stack(top_ids, dim=1), torch.stack(top_vals, dim=1)
        )

    def output_rows(self, generation: GenerationOutput, example_indices: Sequence[int]) -> list[dict[str, Any]]:
        """Rows in the raw-results output schema (text, ids up to and incl. EOS, top-k per step)."""
        rows = []
        ids = generation.token_ids.tolist()
        tids = generation.topk_token_ids.tolist()
        tvals = generation.topk_logits.tolist()
        texts = self.dump([ids[b][: generation.lengths[b]] for b in range(len(example_indices))])  # one batch call
        for b, example_index in enumerate(example_indices):
            n = generation.lengths[b]
            rows.append({
                "example_index": int(example_index),
                "output_text": texts[b],
                "output_token_ids": ids[b][:n],
                "topk_token_ids": tids[b][:n],
                "topk_logits": tvals[b][:n],
            })
        return rows
