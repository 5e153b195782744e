"""The Grounder end to end on a tiny random CLIP: shapes, ranges, components, COM, variants."""

from __future__ import annotations

import pytest
import torch

from bicm import BiCMConfig, BicmError, BicmWarning, Grounder, Proposals
from bicm.crops import crop, crop_pixels, encode_crops

from .helpers import SCENE_BOXES, SCENE_NAMES, draw_scene, make_backbone

QUERIES = ["a red square", "the blue ball on the right", "grass"]


@pytest.fixture(scope="module")
def grounder():
    return Grounder(make_backbone())


@pytest.fixture(scope="module")
def named():
    return Proposals(torch.tensor(SCENE_BOXES), scores=[0.9, 0.8, 0.3], class_names=SCENE_NAMES, source="test")


def test_result_shapes_and_ranges(grounder, named):
    results = grounder.ground_many(draw_scene(), QUERIES, named)
    assert [r.query for r in results] == QUERIES
    for r in results:
        assert r.image_size == (320, 240)
        assert r.attention.shape == r.attention_raw.shape == (240, 320)
        assert 0 <= float(r.attention.min()) and float(r.attention.max()) == pytest.approx(1.0)
        assert float(r.attention_raw.min()) >= 0
        assert r.qam_box is not None
        c = r.candidates
        assert len(c) == 4 and c.qam_index == 3  # 3 proposals + P_t
        assert c.boxes.shape == (4, 4)
        for scores in (c.s_pq, c.s_cq, c.s_td, c.fused):
            assert scores.shape == (4,) and torch.isfinite(scores).all()
        assert (c.s_pq.abs() <= 1 + 1e-5).all() and (c.s_cq.abs() <= 1 + 1e-5).all()
        assert torch.allclose(c.fused, c.s_pq + c.s_cq + 1000.0 * c.s_td, atol=1e-5)
        assert r.selected == [int(c.fused.argmax())]
        assert r.box == tuple(c.boxes[r.selected[0]].tolist())
        x1, y1, x2, y2 = r.box
        assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240
        assert r.score == pytest.approx(float(c.fused.max()))
        assert -1 <= r.s_iq <= 1
        assert r.to_dict()["box"] == [round(v, 2) for v in r.box]


def test_com_scores_are_the_papers_equations(grounder, named):
    image = draw_scene()
    r = grounder.ground(image, "a red square", named)
    backbone = grounder.backbone
    f_q = backbone.encode_text(["a red square"])[0]
    crops = backbone.encode_images([crop(image, b) for b in SCENE_BOXES + [list(r.qam_box)]])
    names = backbone.encode_text(SCENE_NAMES)
    s_pq = crops @ f_q
    s_cq = names @ f_q
    assert torch.allclose(r.candidates.s_pq, s_pq, atol=1e-5)
    assert torch.allclose(r.candidates.s_cq[:3], s_cq, atol=1e-5)
    # P_t takes the class name (and S_CQ) of the proposal that best matches the query by name
    best = int(s_cq.argmax())
    assert r.candidates.class_names[3] == SCENE_NAMES[best]
    assert r.candidates.s_cq[3] == pytest.approx(float(s_cq[best]))
    assert torch.allclose(encode_crops(backbone, image, torch.tensor(SCENE_BOXES)), crops[:3], atol=1e-6)


def test_crops_prepared_ahead_come_back_in_order(grounder):
    """More crops than one batch: the next batch is cut on a worker thread while the current
    one is encoded; the result is the same as one batch, row for row."""
    backbone = grounder.backbone
    image = draw_scene()
    boxes = torch.tensor([[5.0 * i, 3.0 * i, 60.0 + 9 * i, 40.0 + 7 * i] for i in range(11)])
    whole = backbone.encode_pixels(crop_pixels(image, boxes.tolist(), backbone.spec))
    for batch_size in (1, 3, 11, 64):
        assert torch.allclose(encode_crops(backbone, image, boxes, batch_size=batch_size), whole, atol=1e-6)
    reversed_ = encode_crops(backbone, image, boxes.flip(0), batch_size=4)
    assert torch.allclose(reversed_, whole.flip(0), atol=1e-6)


def test_crop_features_match_open_clips_transform_of_each_crop(grounder):
    backbone = grounder.backbone
    image = draw_scene()
    boxes = torch.tensor([[10.0, 10.0, 300.0, 40.0], [50.0, 5.0, 70.0, 235.0], [0.0, 0.0, 320.0, 240.0]] + SCENE_BOXES)
    ours = encode_crops(backbone, image, boxes)
    reference = torch.cat([backbone.encode_images([crop(image, b)]) for b in boxes.tolist()])
    assert torch.allclose(ours, reference, atol=1e-6)


def test_ground_many_equals_ground_one_by_one(grounder, named):
    image = draw_scene()
    together = grounder.ground_many(image, QUERIES, named)
    for query, shared in zip(QUERIES, together):
        alone = grounder.ground(image, query, named)
        assert alone.box == shared.box
        assert torch.allclose(alone.candidates.fused, shared.candidates.fused, atol=1e-5)
        assert torch.allclose(alone.attention_raw, shared.attention_raw, atol=1e-7)


def test_table4_component_sets(grounder, named):
    image = draw_scene()
    qam = grounder.with_config(components=("qam",)).ground(image, "a red square", named)
    assert len(qam.candidates) == 1 and qam.box == qam.qam_box
    assert qam.candidates.s_pq is None and qam.candidates.s_cq is None

    com = grounder.with_config(components=("com",)).ground(image, "a red square", named)
    assert len(com.candidates) == 3 and com.qam_box is None and com.attention is None
    assert com.candidates.s_td is None
    assert torch.allclose(com.candidates.fused, com.candidates.s_pq + com.candidates.s_cq)

    qam_com = grounder.with_config(components=("qam", "com")).ground(image, "a red square", named)
    assert len(qam_com.candidates) == 4
    assert torch.allclose(qam_com.candidates.fused, qam_com.candidates.s_pq + qam_com.candidates.s_cq)

    full = grounder.ground(image, "a red square", named)
    td = full.candidates.s_td
    assert torch.allclose(full.candidates.fused, qam_com.candidates.fused + 1000.0 * td, atol=1e-5)

    with pytest.raises(BicmError, match="add qam"):
        BiCMConfig(components=("com", "sf"))
    with pytest.raises(BicmError, match="unknown components"):
        BiCMConfig(components=("qam", "detr"))


def test_table6_com_variants(grounder, named):
    image = draw_scene()
    cls = grounder.with_config(com_mode="class").ground(image, "a red square", named)
    vis = grounder.with_config(com_mode="visual").ground(image, "a red square", named)
    both = grounder.ground(image, "a red square", named)
    assert cls.candidates.s_pq is None and vis.candidates.s_cq is None
    assert torch.allclose(both.candidates.s_pq, vis.candidates.s_pq)
    assert torch.allclose(both.candidates.s_cq, cls.candidates.s_cq)


def test_table5_vanilla_attention_map(grounder, named):
    image = draw_scene()
    va = grounder.with_config(attention="va").ground_many(image, QUERIES, named)
    assert all(torch.equal(r.attention_raw, va[0].attention_raw) for r in va)
    assert len({r.qam_box for r in va}) == 1


def test_normalized_td_scale(grounder, named):
    image = draw_scene()
    raw = grounder.ground(image, "grass", named)
    norm = grounder.with_config(td_scale="normalized").ground(image, "grass", named)
    assert (norm.candidates.s_td >= 0).all() and (norm.candidates.s_td <= 1).all()
    assert float(norm.candidates.s_td.max()) > 10 * float(raw.candidates.s_td.max())


def test_unnamed_proposals_use_s_pq_alone(grounder):
    r = grounder.ground(draw_scene(), "a red square", SCENE_BOXES)
    assert r.candidates.s_cq is None
    assert any("S_PQ alone" in n for n in r.notes)
    assert torch.allclose(r.candidates.fused, r.candidates.s_pq + 1000.0 * r.candidates.s_td, atol=1e-5)
    with pytest.raises(BicmError, match="class-name mode needs"):
        grounder.with_config(com_mode="class").ground(draw_scene(), "a red square", SCENE_BOXES)


def test_zero_proposals_leave_qam_alone(grounder):
    r = grounder.ground(draw_scene(), "a red square", None)
    assert len(r.candidates) == 1 and r.box == r.qam_box
    assert any("no proposals" in n for n in r.notes)
    with pytest.raises(BicmError, match="nothing to choose from"):
        grounder.with_config(components=("com",)).ground(draw_scene(), "a red square", [])


def test_boxes_outside_the_image_are_clipped_and_degenerate_dropped(grounder):
    boxes = [[-20, -10, 100, 100], [300, 200, 400, 300], [50, 50, 50, 80], [60, 60, 40, 90], [400, 300, 500, 400]]
    with pytest.warns(BicmWarning) as record:
        r = grounder.with_config(components=("com",)).ground(draw_scene(), "a red square", boxes)
    messages = " ".join(str(w.message) for w in record)
    assert "2 proposal box(es) reach outside" in messages and "3 degenerate" in messages
    assert r.candidates.boxes.tolist() == [[0.0, 0.0, 100.0, 100.0], [300.0, 200.0, 320.0, 240.0]]


def test_union_selection_covers_its_members(grounder, named):
    r = grounder.with_config(selection="union-above-mean").ground(draw_scene(), "grass", named)
    fused = r.candidates.fused
    above = (fused > fused.mean()).nonzero().flatten().tolist()
    assert r.selected == (above or [int(fused.argmax())])
    members = r.candidates.boxes[r.selected]
    assert r.box == (
        float(members[:, 0].min()),
        float(members[:, 1].min()),
        float(members[:, 2].max()),
        float(members[:, 3].max()),
    )


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_query_is_refused(grounder, bad):
    with pytest.raises(BicmError, match="query 1 is empty"):
        grounder.ground(draw_scene(), bad, None)


def test_query_whitespace_is_normalised(grounder):
    r = grounder.ground(draw_scene(), "  a   red\nsquare ", SCENE_BOXES)
    assert r.query == "a red square"


def test_class_prompt_template(named):
    backbone = make_backbone()
    plain = Grounder(backbone).ground(draw_scene(), "a red square", named)
    prompted = Grounder(backbone, BiCMConfig(class_prompt="a photo of a {}.")).ground(draw_scene(), "a red square", named)
    f_q = backbone.encode_text(["a red square"])[0]
    expected = backbone.encode_text([f"a photo of a {n}." for n in SCENE_NAMES]) @ f_q
    assert torch.allclose(prompted.candidates.s_cq[:3], expected, atol=1e-5)
    assert not torch.allclose(plain.candidates.s_cq, prompted.candidates.s_cq)
    with pytest.raises(BicmError, match="exactly one"):
        BiCMConfig(class_prompt="a photo")


def test_resize_mode_override_sees_the_whole_image(grounder, named):
    squash = grounder.with_config(qam_resize="squash").ground(draw_scene(), "grass", named)
    crop_view = grounder.ground(draw_scene(), "grass", named)
    assert (crop_view.attention[:, :30] == 0).all()  # outside the center crop
    scale = 85 / 320  # 320x240 -> 85x64, then 10 px cropped on each side
    assert crop_view.view_box == pytest.approx((10 / scale, 0.0, 74 / scale, 240.0))
    assert squash.view_box == (0.0, 0.0, 320.0, 240.0)
    assert squash.attention[:, :30].max() > 0  # squash keeps every pixel in view


def test_queries_stream_in_chunks_with_the_same_results(grounder, named, monkeypatch):
    """query_chunk only bounds memory: the results are those of one piece, the per-image work
    (the proposal crops) is done once, and a chunk's maps are gone once the next is made."""
    import weakref

    image = draw_scene()
    queries = [f"{q} {i}" for i in range(3) for q in QUERIES]  # 9 queries
    whole = grounder.ground_many(image, queries, named)
    crop_calls = []
    real = grounder.encoder.crops
    monkeypatch.setattr(grounder.encoder, "crops", lambda im, boxes, *a, **k: crop_calls.append(len(boxes)) or real(im, boxes, *a, **k))
    chunked = grounder.with_config(query_chunk=2)
    monkeypatch.setattr(chunked, "encoder", grounder.encoder)
    parts = chunked.ground_many(image, queries, named)
    assert [r.query for r in parts] == queries
    for a, b in zip(whole, parts):
        assert a.box == b.box and a.qam_box == b.qam_box
        assert torch.allclose(a.candidates.fused, b.candidates.fused, atol=1e-5)
        assert torch.allclose(a.attention_raw, b.attention_raw, atol=1e-7)
    # the proposals' crops once, with the first chunk's QAM boxes; then only each chunk's QAM boxes
    assert len(named) < crop_calls[0] <= len(named) + 2
    assert all(n <= 2 for n in crop_calls[1:]) and len(crop_calls) <= 1 + 5
    chunks = chunked.iter_extract(image, queries, named)
    first = next(chunks)
    assert len(first.queries) == 2 and first.maps["qa"].raw.shape[0] == 2
    held = weakref.ref(first.maps["qa"].raw)
    del first
    second = next(chunks)
    assert held() is None  # gone before the next chunk's maps were made
    sizes = [len(second.queries)] + [len(f.queries) for f in chunks]
    assert sizes == [2, 2, 2, 1]
    with pytest.raises(BicmError, match="query chunk"):
        grounder.with_config(query_chunk=0)
