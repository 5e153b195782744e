"""SF and selection: S_TD as a box mean, the fused score, the three selection policies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bicm.fusion import box_means, fuse, integral_image, select, union_box

from .helpers import brute_force_mean


boxes_strategy = st.lists(
    st.tuples(
        st.floats(0, 30), st.floats(0, 20), st.floats(0, 30), st.floats(0, 20)
    ).map(lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]) + 0.5, max(b[1], b[3]) + 0.5)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(boxes=boxes_strategy, seed=st.integers(0, 1000))
def test_box_means_equal_brute_force(boxes, seed):
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(2, 20, 30, generator=gen) * 1e-3
    table = integral_image(maps)
    got = box_means(table, torch.tensor(boxes, dtype=torch.float32))
    assert got.shape == (2, len(boxes))
    for q in range(2):
        for k, box in enumerate(boxes):
            assert got[q, k].item() == pytest.approx(brute_force_mean(maps[q], box), rel=1e-5, abs=1e-12)


def test_box_means_per_query_boxes_and_constant_map():
    maps = torch.full((3, 10, 10), 0.25)
    table = integral_image(maps)
    boxes = torch.tensor([[[0, 0, 10, 10]], [[2, 2, 3, 3]], [[9.5, 9.5, 10, 10]]], dtype=torch.float32)
    assert torch.allclose(box_means(table, boxes), torch.full((3, 1), 0.25))
    m = torch.zeros(1, 4, 4)
    m[0, :2, :2] = 1.0
    assert box_means(integral_image(m), torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 4.0]]))[0].tolist() == [
        1.0,
        0.25,
    ]


def test_fuse_is_the_papers_sum():
    s_bu = torch.tensor([0.5, 0.6])
    s_td = torch.tensor([1e-3, 2e-4])
    s_kam = torch.tensor([0.9, 0.1])
    assert torch.allclose(fuse(s_bu, s_td, 1000.0), torch.tensor([1.5, 0.8]))
    assert torch.allclose(fuse(s_bu, s_td, 1000.0, s_kam, 1.0), torch.tensor([2.4, 0.9]))
    assert torch.allclose(fuse(s_bu, None), s_bu)
    with pytest.raises(ValueError):
        fuse(None, None)


BOXES = torch.tensor(
    [
        [0.0, 0.0, 10.0, 10.0],  # area 100
        [20.0, 20.0, 60.0, 60.0],  # area 1600
        [5.0, 5.0, 25.0, 15.0],  # area 200
        [50.0, 0.0, 55.0, 5.0],  # area 25
    ]
)


def test_argmax_selection():
    box, idx = select(BOXES, torch.tensor([0.1, 0.2, 0.9, 0.3]), "argmax")
    assert idx == [2] and box == (5.0, 5.0, 25.0, 15.0)


def test_union_of_above_mean_boxes():
    # mean 0.5: boxes 0 and 2 are above it
    box, idx = select(BOXES, torch.tensor([0.8, 0.1, 0.9, 0.2]), "union-above-mean")
    assert idx == [0, 2] and box == (0.0, 0.0, 25.0, 15.0)


def test_largest_of_above_mean_boxes():
    # mean 0.5: boxes 1 (area 1600) and 2 (area 200) are above; the best score is box 2
    box, idx = select(BOXES, torch.tensor([0.1, 0.7, 0.9, 0.3]), "largest-above-mean")
    assert idx == [1] and box == (20.0, 20.0, 60.0, 60.0)


@pytest.mark.parametrize("policy", ["union-above-mean", "largest-above-mean"])
def test_policies_fall_back_to_argmax_without_a_box_above_the_mean(policy):
    box, idx = select(BOXES[:1], torch.tensor([0.3]), policy)
    assert idx == [0]
    box, idx = select(BOXES, torch.full((4,), 0.5), policy)
    assert idx == [0]


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown selection policy"):
        select(BOXES, torch.tensor([0.1, 0.2, 0.3, 0.4]), "median")


def test_union_box():
    assert union_box([[1, 2, 3, 4], [0, 5, 2, 9]]) == (0.0, 2.0, 3.0, 9.0)


def test_lambda_t_by_the_papers_rule():
    from bicm.fusion import calibrate_lambda_t

    # ViT-B/32-like scales: cosines ~0.5, raw map ~5e-4 -> 1000, the paper's value
    assert calibrate_lambda_t(torch.tensor([0.45, 0.5, 0.62]), torch.tensor([4e-4, 5e-4, 9e-4])) == 1000.0
    # a map ten times larger needs a ten times smaller weight; signs do not matter
    assert calibrate_lambda_t(torch.tensor([-0.5, 0.5, 0.5]), torch.tensor([5e-3, 4e-3, 6e-3])) == 100.0
    with pytest.raises(ValueError):
        calibrate_lambda_t(torch.tensor([0.5]), torch.tensor([0.0]))
