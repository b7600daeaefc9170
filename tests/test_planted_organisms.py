"""Checks on the planted addition organisms: the planted spec is well formed, ``carry_0`` moves with the planted
subspace of the layer-0 output at ``digit_1_0`` (and not with a random 2-d subspace there), and the organisms
still add. Decoding and token positions go through the project's own ``LMPipeline`` and addition positions;
the labels come from the causal model."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from experiments.pipeline import LMPipeline
from tasks.general_addition.causal_models import build_addition_model, carries_of, setting_from_addends
from tasks.general_addition.organism import PLANTED_ALIGNED_DIR, PLANTED_ROTATED_DIR, PlantedSpec, load_planted_spec
from tasks.general_addition.organism.train_organism import AdditionData, TrainConfig, encode_training_batch
from tasks.general_addition.organism.train_planted import digit_1_0_columns, planted_basis, random_basis
from tasks.general_addition.token_positions import addition_token_positions

ORGANISMS = {"aligned": PLANTED_ALIGNED_DIR, "rotated": PLANTED_ROTATED_DIR}
N_PAIRS = 64
RANDOM_SUBSPACE_SEED = 7


@pytest.fixture(scope="module", params=sorted(ORGANISMS))
def organism(request) -> tuple[str, LMPipeline, PlantedSpec]:
    torch.set_num_threads(1)
    path = ORGANISMS[request.param]
    return request.param, LMPipeline(str(path), max_new_tokens=5, device="cpu"), load_planted_spec(path)


@pytest.fixture(scope="module")
def heldout() -> AdditionData:
    """The shipped organism's held-out split (seed 0), which the planted organisms never trained on either."""
    return AdditionData(TrainConfig(seed=0))


def settings(problems: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [setting_from_addends(int(a), int(b), len(a)) for a, b in problems]


def differing_pairs(heldout: AdditionData, n: int, seed: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``n`` (base, source) pairs of held-out 2-digit problems whose carry_0 differ."""
    problems = heldout.heldout_problems(2)
    by_carry = {c: [p for p in problems if carries_of(int(p[0]), int(p[1]), 2)[0] == c] for c in (0, 1)}
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        c = rng.randrange(2)
        pairs.append((rng.choice(by_carry[c]), rng.choice(by_carry[1 - c])))
    return [(base, source) for base, source in zip(settings([b for b, _ in pairs]), settings([s for _, s in pairs]))]


def interchange_iia(pipeline: LMPipeline, pairs: list[tuple[dict, dict]], basis: torch.Tensor, layer: int,
                    position_id: str) -> float:
    """Share of pairs whose greedy answer after the interchange is the causal model's counterfactual answer."""
    position = {p.id: p for p in addition_token_positions(pipeline, 2)}[position_id]
    bases, sources = [b for b, _ in pairs], [s for _, s in pairs]
    block = pipeline.model.model.layers[layer]

    def columns(batch, rows):
        return torch.tensor([batch.pad_offsets[i] + position.index(s)[0] for i, s in enumerate(rows)])

    src_batch = pipeline.load(sources)
    kept: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda m, a, out: kept.append(out))
    with torch.no_grad():
        pipeline.body(**src_batch.model_inputs())
    handle.remove()
    x_src = kept[0][torch.arange(len(sources)), columns(src_batch, sources)]

    base_batch = pipeline.load(bases)
    cols = columns(base_batch, bases)

    def patch(module, args, out):
        rows = torch.arange(out.shape[0])
        x = out[rows, cols]
        return out.index_put((rows, cols), x + ((x_src - x) @ basis) @ basis.T)

    def prompt_forward(inputs):
        handle = block.register_forward_hook(patch)
        try:
            return pipeline.body(**inputs)
        finally:
            handle.remove()

    generation = pipeline.greedy_decode(base_batch, prompt_forward, max_new_tokens=5)
    causal = build_addition_model(2)
    eos = pipeline.tokenizer.eos_token_id
    hits = 0
    for b, row in enumerate(pipeline.output_rows(generation, range(len(pairs)))):
        label = causal.run_interchange(bases[b], {"carry_0": sources[b]})["raw_output"]
        assert label != causal.run_forward(bases[b])["raw_output"]  # every pair is informative
        hits += row["output_text"] == label and row["output_token_ids"][-1] == eos
    return hits / len(pairs)


def test_spec_well_formed(organism) -> None:
    kind, pipeline, spec = organism
    assert spec.basis_kind == kind
    assert (spec.variable, spec.layer, spec.component, spec.position) == ("carry_0", 0, "block_output", "digit_1_0")
    assert spec.position in {p.id for p in addition_token_positions(pipeline, 2)}
    basis = spec.basis_matrix(torch.float64)
    assert basis.shape == (pipeline.hidden_size, 2) == (spec.d, spec.k)
    assert torch.allclose(basis.T @ basis, torch.eye(2, dtype=torch.float64), atol=1e-5)
    if kind == "aligned":
        assert torch.equal(basis, torch.eye(spec.d, 2, dtype=torch.float64))
    else:
        assert basis.abs().max() < 0.5 and (basis.abs() > 1e-3).all(dim=1).sum() > 100  # spread over all dimensions
        regenerated = planted_basis("rotated", spec.seed, spec.d, spec.k).double()
        assert torch.allclose(regenerated @ regenerated.T, basis @ basis.T, atol=1e-5)


def test_digit_1_0_columns_match_token_positions(organism) -> None:
    _, pipeline, _ = organism
    tok = pipeline.tokenizer
    problems = [("58", "67"), ("123", "456"), ("05", "23"), ("007", "120")]
    batch = encode_training_batch(problems, tok.get_vocab(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    cols = digit_1_0_columns(batch["attention_mask"], [len(a) for a, _ in problems])
    for i, s in enumerate(settings(problems)):
        position = {p.id: p for p in addition_token_positions(pipeline, len(problems[i][0]))}["digit_1_0"]
        pad = int((batch["attention_mask"][i] == 0).sum())
        assert cols[i].item() == pad + position.index(s)[0]


def test_carry_0_lives_in_planted_subspace(organism, heldout) -> None:
    _, pipeline, spec = organism
    pairs = differing_pairs(heldout, N_PAIRS, seed=11)
    planted = interchange_iia(pipeline, pairs, spec.basis_matrix(), spec.layer, spec.position)
    other = interchange_iia(pipeline, pairs, random_basis(RANDOM_SUBSPACE_SEED, spec.d, spec.k), spec.layer,
                            spec.position)
    assert planted >= 0.9, planted
    assert other <= 0.3, other


def test_task_accuracy(organism, heldout) -> None:
    _, pipeline, _ = organism
    rng = random.Random(5)
    problems = rng.sample(heldout.heldout_problems(2), 100) + rng.sample(heldout.heldout_problems(3), 100)
    rng.shuffle(problems)
    rows = pipeline.output_rows(pipeline.generate(settings(problems), max_new_tokens=5), range(len(problems)))
    eos = pipeline.tokenizer.eos_token_id
    correct = [row["output_text"] == str(int(a) + int(b)) and row["output_token_ids"][-1] == eos
               for (a, b), row in zip(problems, rows)]
    assert sum(correct) / len(correct) >= 0.98
