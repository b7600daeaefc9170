"""An independent reference for interchange interventions: plain torch forward hooks, no pyvene.

Used by the engine tests as ground truth. It shares nothing with ``experiments/`` except the
tokenised, left-padded batches (``LMPipeline.load``), so the padded columns are the same as the
engine's. Generation is a cache-free greedy loop: every step re-runs the whole sequence with the
patch hooks on, which patches exactly the prompt columns (new tokens are appended on the right),
so it is equivalent to "patch the prompt pass, then decode from its KV cache".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class RefUnit:
    """Where to patch: component as in ``experiments.engine.model_units`` (layer -1 = embeddings)."""

    layer: int
    component: str
    head: int | None = None


def _layers(model):
    if hasattr(model, "transformer"):  # GPT-2
        return model.transformer.h
    return model.model.layers


def _attn(block):
    return block.attn if hasattr(block, "attn") else block.self_attn


def _out_proj(block):
    attn = _attn(block)
    return attn.c_proj if hasattr(attn, "c_proj") else attn.o_proj


def head_dim_from_weights(model) -> int:
    """Per-head width read off the attention output projection's input features."""
    proj = _out_proj(_layers(model)[0])
    in_features = proj.weight.shape[0] if type(proj).__name__ == "Conv1D" else proj.weight.shape[1]
    return in_features // model.config.num_attention_heads


def module_and_side(model, unit: RefUnit) -> tuple[torch.nn.Module, str]:
    """The HF module holding the unit and whether it is that module's input ("in") or output ("out")."""
    layers = _layers(model)
    if unit.component == "block_output":
        return (layers[0], "in") if unit.layer == -1 else (layers[unit.layer], "out")
    if unit.component == "block_input":
        return layers[unit.layer], "in"
    if unit.component == "attention_output":
        return _attn(layers[unit.layer]), "out"
    if unit.component == "mlp_output":
        return layers[unit.layer].mlp, "out"
    if unit.component == "head_attention_value_output":
        return _out_proj(layers[unit.layer]), "in"
    raise ValueError(unit.component)


def dims(model, unit: RefUnit) -> slice:
    if unit.head is None:
        return slice(None)
    hd = head_dim_from_weights(model)
    return slice(unit.head * hd, (unit.head + 1) * hd)


def _hook(module: torch.nn.Module, side: str, fn):
    """Register ``fn(tensor) -> tensor | None`` on the module's main input or output tensor."""
    if side == "out":
        def out_hook(_mod, _args, output):
            if isinstance(output, tuple):
                new = fn(output[0])
                return None if new is None else (new, *output[1:])
            return fn(output)
        return module.register_forward_hook(out_hook)

    def pre_hook(_mod, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})
    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def collect(model, batch, units: Sequence[RefUnit]) -> list[torch.Tensor]:
    """Full (B, T, width) activation of each unit on one forward of ``batch`` (head units: their slice)."""
    store: list[torch.Tensor | None] = [None] * len(units)
    handles = []
    for i, unit in enumerate(units):
        module, side = module_and_side(model, unit)
        sl = dims(model, unit)

        def grab(t, i=i, sl=sl):
            store[i] = t[..., sl].detach().clone()
            return None
        handles.append(_hook(module, side, grab))
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=_positions(batch.attention_mask))
    finally:
        for h in handles:
            h.remove()
    return store  # type: ignore[return-value]


@dataclass
class RefOutput:
    token_ids: list[list[int]]  # per row, up to and including EOS
    step_logits: list[torch.Tensor]  # per step: (B, V) float logits


@torch.no_grad()
def patched_generate(
    model,
    base_batch,
    patches: Sequence[tuple[RefUnit, torch.Tensor, list[list[int]], list[list[int]]]],
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
) -> RefOutput:
    """Greedy decoding of ``base_batch`` with each patch applied at every forward.

    A patch is ``(unit, source (B, T_src, width), base_cols[b], src_cols[b])``: row b's activation at
    padded column ``base_cols[b][j]`` gets the source value of row b at padded column ``src_cols[b][j]``.
    """
    handles = []
    for unit, source, base_cols, src_cols in patches:
        module, side = module_and_side(model, unit)
        sl = dims(model, unit)

        def patch(t, source=source, base_cols=base_cols, src_cols=src_cols, sl=sl):
            t = t.clone()
            for b in range(t.shape[0]):
                for bc, sc in zip(base_cols[b], src_cols[b]):
                    t[b, bc, sl] = source[b, sc]
            return t
        handles.append(_hook(module, side, patch))
    try:
        ids, mask = base_batch.input_ids, base_batch.attention_mask
        bsz = ids.shape[0]
        finished = [False] * bsz
        out: list[list[int]] = [[] for _ in range(bsz)]
        step_logits = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1, :].float()
            step_logits.append(logits)
            nxt = logits.argmax(-1).tolist()
            for b in range(bsz):
                if finished[b]:
                    nxt[b] = pad_id
                else:
                    out[b].append(nxt[b])
                    finished[b] = eos_id is not None and nxt[b] == eos_id
            if all(finished):
                break
            ids = torch.cat([ids, torch.tensor(nxt, device=ids.device)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    finally:
        for h in handles:
            h.remove()
    return RefOutput(out, step_logits)


def reference_cell(
    pipeline,
    bases: list[dict[str, Any]],
    counterfactuals: list[dict[str, Any]],
    units: Sequence[tuple[RefUnit, Any]],
) -> RefOutput:
    """Patch every (unit, TokenPosition) of a cell from the counterfactuals into the bases; greedy decode."""
    model = pipeline.model
    base_batch = pipeline.load(bases)
    cf_batch = pipeline.load(counterfactuals)
    sources = collect(model, cf_batch, [u for u, _ in units])
    patches = []
    for (unit, position), source in zip(units, sources):
        base_cols = [[i + base_batch.pad_offsets[b] for i in position.index(s)] for b, s in enumerate(bases)]
        src_cols = [[i + cf_batch.pad_offsets[b] for i in position.counterfactual_index(s)]
                    for b, s in enumerate(counterfactuals)]
        patches.append((unit, source, base_cols, src_cols))
    tok = pipeline.tokenizer
    return patched_generate(model, base_batch, patches, pipeline.max_new_tokens, tok.eos_token_id, tok.pad_token_id)


def assert_rows_match(engine_rows: list[dict[str, Any]], ref: RefOutput, atol: float = 1e-5, where: str = "") -> None:
    """Engine rows (raw-results schema, one per base row) equal the reference: ids exactly, top-k logits to atol."""
    assert len(engine_rows) == len(ref.token_ids), where
    for b, row in enumerate(engine_rows):
        assert row["output_token_ids"] == ref.token_ids[b], f"{where} row {b}: generated ids differ"
        for step, (ids, vals) in enumerate(zip(row["topk_token_ids"], row["topk_logits"])):
            ref_vals, ref_ids = ref.step_logits[step][b].topk(len(ids))
            torch.testing.assert_close(
                torch.tensor(vals), ref_vals.cpu(), atol=atol, rtol=0, msg=lambda m: f"{where} row {b} step {step}: {m}"
            )
            # the engine's top-k ids hold exactly the reference logits (robust to near-ties in ordering)
            torch.testing.assert_close(
                ref.step_logits[step][b][torch.tensor(ids)].cpu(), torch.tensor(vals), atol=atol, rtol=0,
                msg=lambda m: f"{where} row {b} step {step} (logits at engine top-k ids): {m}",
            )
