"""Property-based tests (hypothesis) of the pure pieces: boxes, proposal sanitising, the
attention-map operations and the fusion/selection step. Inputs include hostile values:
inverted, zero-area, far-outside and huge boxes, flat and constant maps, ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bicm import BicmError
from bicm.boxes import union_box
from bicm.fusion import SELECTION_POLICIES, box_means, fuse, integral_image, select
from bicm.proposals import Proposals
from bicm.qam import normalize, threshold_box

from .helpers import brute_force_mean

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

coord = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
small_coord = st.floats(min_value=-50, max_value=150, allow_nan=False, allow_infinity=False, width=32)
box = st.tuples(coord, coord, coord, coord)
small_box = st.tuples(small_coord, small_coord, small_coord, small_coord)
proper_box = st.tuples(small_coord, small_coord, st.floats(0.5, 80, width=32), st.floats(0.5, 80, width=32)).map(
    lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3])
)
size = st.integers(min_value=1, max_value=120)


def maps_strategy(max_side: int = 12):
    return st.tuples(st.integers(1, 3), st.integers(1, max_side), st.integers(1, max_side)).flatmap(
        lambda s: hnp.arrays(np.float32, s, elements=st.floats(-1e3, 1e3, width=32, allow_nan=False))
    )


# --------------------------------------------------------------------------------------
# bicm.boxes
# --------------------------------------------------------------------------------------
@SETTINGS
@given(st.lists(box, min_size=1, max_size=12))
def test_union_box_contains_every_box_and_is_order_free(boxes):
    u = union_box(boxes)
    for b in boxes:
        assert u[0] <= b[0] and u[1] <= b[1] and u[2] >= b[2] and u[3] >= b[3]
    assert union_box(list(reversed(boxes))) == u
    assert union_box([u]) == u
    # tight: every side is some box's side
    assert u[0] in [b[0] for b in boxes] and u[3] in [b[3] for b in boxes]


def test_union_of_nothing_is_a_clear_error():
    with pytest.raises(BicmError):
        union_box([])


# --------------------------------------------------------------------------------------
# Proposals.sanitize
# --------------------------------------------------------------------------------------
@SETTINGS
@given(st.lists(small_box, max_size=20), size, size, st.sampled_from([0.0, 1.0, 3.5]))
def test_sanitize_keeps_proper_boxes_inside_the_image(boxes, width, height, min_size):
    n = len(boxes)
    scores = [float(i) for i in range(n)]
    names = [f"name{i}" for i in range(n)]
    props = Proposals(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), scores=scores, class_names=names or None)
    out = props.sanitize(width, height, min_size)
    kept = out.proposals
    assert len(kept) + out.n_dropped == n
    assert 0 <= out.n_clipped <= len(kept)
    b = kept.boxes
    assert torch.isfinite(b).all()
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= width).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= height).all()
    assert ((b[:, 2] - b[:, 0]) >= min_size).all() and ((b[:, 3] - b[:, 1]) >= min_size).all()
    # scores and names travel with their boxes, in order
    if len(kept):
        index = [int(s) for s in kept.scores.tolist()]
        assert index == sorted(index)
        assert kept.class_names == [f"name{i}" for i in index]
    # idempotent
    again = kept.sanitize(width, height, min_size)
    assert again.n_clipped == 0 and again.n_dropped == 0 and torch.equal(again.proposals.boxes, b)


@SETTINGS
@given(st.lists(proper_box, min_size=1, max_size=10))
def test_sanitize_leaves_boxes_inside_a_big_image_alone(boxes):
    props = Proposals(torch.tensor(boxes, dtype=torch.float32).clamp(min=0))
    out = props.sanitize(10_000, 10_000, 0.0)
    assume(((props.boxes[:, 2:] - props.boxes[:, :2]) >= 0).all())
    assert out.n_dropped == 0 and out.n_clipped == 0
    assert torch.equal(out.proposals.boxes, props.boxes)


@SETTINGS
@given(st.lists(box, min_size=1, max_size=6), st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 23))
def test_proposals_refuse_non_finite_coordinates(boxes, bad, where):
    values = torch.tensor(boxes, dtype=torch.float32).reshape(-1)
    values[where % values.numel()] = bad
    with pytest.raises(BicmError, match="NaN or infinite"):
        Proposals(values.reshape(-1, 4))


# --------------------------------------------------------------------------------------
# bicm.qam: normalize, threshold_box
# --------------------------------------------------------------------------------------
@SETTINGS
@given(maps_strategy(), st.data())
def test_normalize_is_in_unit_range_zero_outside_and_affine_invariant(maps, data):
    m = torch.from_numpy(maps)
    q, h, w = m.shape
    visible = torch.from_numpy(data.draw(hnp.arrays(np.bool_, (h, w))))
    out = normalize(m, visible)
    assert out.shape == m.shape and torch.isfinite(out).all()
    assert (out >= 0).all() and (out <= 1 + 1e-6).all()
    assert (out[:, ~visible] == 0).all()
    region = visible if visible.any() else torch.ones(h, w, dtype=torch.bool)
    for i in range(q):
        inside = m[i][region]
        if float(inside.max() - inside.min()) > 1e-3 and visible.any():
            assert float(out[i][visible].max()) == pytest.approx(1.0, abs=1e-5)
            assert float(out[i][visible].min()) == pytest.approx(0.0, abs=1e-5)
    scaled = normalize(m * 3.0 + 7.0, visible)
    for i in range(q):  # affine invariance where the map's range survives float32 rounding of 3m + 7
        inside = m[i][region]
        if float(inside.max() - inside.min()) > 1e-3:
            assert torch.allclose(scaled[i], out[i], atol=1e-3)


def test_normalize_of_a_flat_map_is_zero():
    m = torch.full((2, 5, 7), 0.25)
    assert torch.equal(normalize(m, torch.ones(5, 7, dtype=torch.bool)), torch.zeros(2, 5, 7))


@SETTINGS
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 16), st.integers(1, 16)), elements=st.floats(0, 1, width=32)),
       st.floats(0.0, 1.0), st.sampled_from(["largest", "peak", "all"]))
def test_threshold_box_holds_the_hot_pixels(values, threshold, rule):
    m = torch.from_numpy(values)
    h, w = values.shape
    found = threshold_box(m, threshold, rule)
    hot = values >= threshold
    if not hot.any() or values.max() <= 0:
        assert found is None
        return
    assert found is not None
    x1, y1, x2, y2 = found
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert all(float(v).is_integer() for v in found)
    ys, xs = np.nonzero(hot)
    every = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert every[0] <= x1 and every[1] <= y1 and x2 <= every[2] and y2 <= every[3]  # inside the 'all' box
    if rule == "all":
        assert found == tuple(float(v) for v in every)
    if rule == "peak":
        py, px = np.unravel_index(int(np.argmax(np.where(hot, values, -np.inf))), values.shape)
        assert x1 <= px < x2 and y1 <= py < y2
    assert hot[int(y1):int(y2), int(x1):int(x2)].any()


# --------------------------------------------------------------------------------------
# bicm.fusion: integral_image, box_means, fuse, select
# --------------------------------------------------------------------------------------
@SETTINGS
@given(maps_strategy(), st.lists(small_box, min_size=1, max_size=8))
def test_box_means_equal_the_brute_force_mean_for_any_box(maps, boxes):
    table = integral_image(torch.from_numpy(maps))
    assert table.shape == (maps.shape[0], maps.shape[1] + 1, maps.shape[2] + 1)
    assert torch.allclose(table[:, -1, -1], torch.from_numpy(maps).double().sum(dim=(1, 2)), rtol=1e-9, atol=1e-6)
    means = box_means(table, torch.tensor(boxes, dtype=torch.float32))
    assert means.shape == (maps.shape[0], len(boxes)) and torch.isfinite(means).all()
    for i in range(maps.shape[0]):
        for k, b in enumerate(boxes):
            assert float(means[i, k]) == pytest.approx(brute_force_mean(maps[i], b), rel=1e-4, abs=1e-3)


@SETTINGS
@given(st.floats(-5, 5), st.integers(1, 9), st.integers(1, 9), st.lists(small_box, min_size=1, max_size=5))
def test_box_means_of_a_constant_map_are_that_constant(value, h, w, boxes):
    table = integral_image(torch.full((1, h, w), value))
    means = box_means(table, torch.tensor(boxes, dtype=torch.float32))
    assert torch.allclose(means, torch.full_like(means, value), atol=1e-5)


scores_strategy = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=12)


@SETTINGS
@given(scores_strategy, st.floats(0, 2000), st.floats(0, 5), st.data())
def test_fuse_is_the_weighted_sum_of_the_terms_given(s_bu, lambda_t, lambda_k, data):
    n = len(s_bu)
    bu = torch.tensor(s_bu)
    td = torch.tensor(data.draw(st.lists(st.floats(0, 0.01), min_size=n, max_size=n)))
    kam = torch.tensor(data.draw(st.lists(st.floats(0, 1, width=32), min_size=n, max_size=n)))
    assert torch.allclose(fuse(bu, td, lambda_t), bu + lambda_t * td, atol=1e-4)
    assert torch.allclose(fuse(bu, td, lambda_t, kam, lambda_k), bu + lambda_t * td + lambda_k * kam, atol=1e-4)
    assert torch.equal(fuse(bu, None), bu)
    assert torch.allclose(fuse(None, td, lambda_t), lambda_t * td)
    with pytest.raises(ValueError):
        fuse(None, None)


@SETTINGS
@given(st.lists(st.tuples(proper_box, st.floats(-10, 10, width=32)), min_size=1, max_size=12), st.sampled_from(SELECTION_POLICIES))
def test_select_returns_a_box_made_of_above_mean_candidates(pairs, policy):
    boxes = torch.tensor([b for b, _ in pairs], dtype=torch.float32)
    scores = torch.tensor([s for _, s in pairs], dtype=torch.float32)
    chosen_box, chosen = select(boxes, scores, policy)
    assert chosen and all(0 <= i < len(pairs) for i in chosen) and chosen == sorted(set(chosen))
    best = int(scores.argmax())
    above = [i for i in range(len(pairs)) if scores[i] > scores.mean()]
    if policy == "argmax" or not above:
        assert chosen == [best]
        assert chosen_box == tuple(boxes[best].tolist())
        return
    assert set(chosen) <= set(above)
    if policy == "union-above-mean":
        assert chosen == above
        assert chosen_box == union_box(boxes[above])
    else:
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert len(chosen) == 1 and float(areas[chosen[0]]) == float(areas[above].max())
        assert chosen_box == tuple(boxes[chosen[0]].tolist())
    assert float(scores[chosen].max()) <= float(scores[best])


@SETTINGS
@given(st.integers(1, 10), st.floats(-3, 3, width=32), st.sampled_from(SELECTION_POLICIES))
def test_select_with_all_scores_tied_falls_back_to_the_first(n, value, policy):
    boxes = torch.tensor([[i, i, i + 5.0, i + 5.0] for i in range(n)])
    _, chosen = select(boxes, torch.full((n,), value), policy)
    assert chosen == [0]
