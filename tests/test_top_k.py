"""``experiments.top_k.top_k``: same values and ids as torch.topk without ties, ties to the lower index,
NaN ranked first like torch.topk, any leading shape, both the blockwise and the direct path."""

from __future__ import annotations

import pytest
import torch

from experiments.top_k import top_k


@pytest.mark.parametrize("width", [50, 32000, 50257])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_equals_torch_topk_on_untied_rows(width, k):
    logits = torch.randn(37, width, generator=torch.Generator().manual_seed(width + k))
    values, ids = top_k(logits, k)
    expected = logits.topk(k, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(ids, expected.indices)


@pytest.mark.parametrize("width", [40, 4000, 33001])
def test_ties_go_to_the_lower_index(width):
    g = torch.Generator().manual_seed(width)
    logits = torch.randint(0, 3, (64, width), generator=g).float()  # many ties at every rank
    values, ids = top_k(logits, 5)
    stable = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(ids, stable)
    assert torch.equal(values, logits.gather(1, stable))
    assert torch.equal(ids[:, 0], logits.argmax(-1))


def test_a_tie_across_the_kth_place_between_blocks():
    logits = torch.zeros(2, 32000)
    logits[:, [31000, 20, 900]] = 3.0  # three tied maxima in different blocks, out of order
    logits[:, 15000] = 2.0
    logits[:, [25000, 7]] = 1.0  # tied at the k-th place
    values, ids = top_k(logits, 5)
    assert ids.tolist() == [[20, 900, 31000, 15000, 7]] * 2
    assert values.tolist() == [[3.0, 3.0, 3.0, 2.0, 1.0]] * 2


def test_nan_ranks_first_like_torch_topk():
    logits = torch.randn(3, 32000, generator=torch.Generator().manual_seed(0))
    logits[1, 123] = float("nan")
    values, ids = top_k(logits, 3)
    assert ids[1, 0] == 123 and torch.isnan(values[1, 0])
    assert torch.equal(ids[[0, 2]], logits[[0, 2]].topk(3, dim=-1).indices)


def test_leading_shape_and_bad_k():
    logits = torch.randn(2, 3, 1000)
    values, ids = top_k(logits, 4)
    assert values.shape == ids.shape == (2, 3, 4)
    assert torch.equal(ids, logits.topk(4, dim=-1).indices)
    with pytest.raises(ValueError, match="k must be"):
        top_k(logits, 0)
    with pytest.raises(ValueError, match="k must be"):
        top_k(logits, 1001)


@pytest.mark.parametrize("width", [5, 300, 33000])
def test_first_id_is_argmax_with_nan_and_inf(width):
    logits = torch.randn(4, width, generator=torch.Generator().manual_seed(1))
    logits[0, [0, 2, 3]] = float("nan")  # several NaN
    logits[1, 3], logits[1, width - 1] = float("inf"), float("nan")  # NaN outranks +inf
    logits[2, width - 1] = float("nan")  # NaN in the tail columns
    for k in (1, 2):
        _, ids = top_k(logits, k)
        assert torch.equal(ids[:, 0], logits.argmax(-1)), (width, k)
    _, ids = top_k(logits, 2)
    assert ids[0].tolist() == [0, 2]
