"""KAM: the MLP of Fig. 3, its loss and training, its file, and adapted inference (Eq. 11)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from bicm import BiCMConfig, Grounder
from bicm.errors import BicmError
from bicm.kam import KamConfig, KamMLP, KamModel, KamPair, kam_inputs, pair_loss, train_kam
from bicm.pseudo import best_queries

from .helpers import SCENE_BOXES, SCENE_NAMES, draw_scene, make_backbone


def test_mlp_is_fig3_fc_bn_relu_twice_then_fc_and_sigmoid():
    mlp = KamMLP(embed_dim=8, hidden=16)
    kinds = [type(m) for m in mlp.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp.net[0].in_features == 32 and mlp.net[-1].out_features == 1
    mlp.eval()
    x = torch.randn(5, 32)
    s = mlp.score(x)
    assert s.shape == (5,) and bool(((s > 0) & (s < 1)).all())
    assert torch.allclose(s, torch.sigmoid(mlp(x)))


def test_inputs_are_concatenated_in_the_papers_order():
    fi, fq = torch.full((4,), 1.0), torch.full((4,), 4.0)
    fp, fc = torch.full((3, 4), 2.0), torch.full((3, 4), 3.0)
    x = kam_inputs(fi, fp, fc, fq)
    assert x.shape == (3, 16)
    assert [float(x[0, 4 * k]) for k in range(4)] == [1.0, 2.0, 3.0, 4.0]
    assert float(kam_inputs(fi, fp, None, fq)[0, 8]) == 0.0  # no class names: zeros


def test_pair_loss_is_softmax_cross_entropy_over_each_pairs_candidates():
    logits = torch.tensor([0.5, 2.0, -1.0, 0.0, 3.0])
    loss = pair_loss(logits, [3, 2], [[1], [0]])
    expected = (F.cross_entropy(logits[:3][None], torch.tensor([1])) + F.cross_entropy(logits[3:][None], torch.tensor([0]))) / 2
    assert torch.allclose(loss, expected)
    # a union label: uniform target over its candidates
    union = pair_loss(logits[:3], [3], [[0, 1]])
    assert torch.allclose(union, -F.log_softmax(logits[:3], 0)[[0, 1]].mean())


def _synthetic_pairs(n: int, seed: int, e: int = 8) -> list[KamPair]:
    """The labelled candidate is the one whose crop matches the query."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        fq = F.normalize(torch.randn(e, generator=g), dim=0)
        fp = F.normalize(torch.randn(k, e, generator=g), dim=1)
        t = int(torch.randint(0, k, (1,), generator=g))
        fp[t] = F.normalize(fq + 0.3 * torch.randn(e, generator=g), dim=0)
        fi = F.normalize(torch.randn(e, generator=g), dim=0)
        pairs.append(KamPair(fi, fq, fp, None, [t]))
    return pairs


@pytest.mark.slow
def test_training_learns_the_labels_and_is_deterministic():
    train, held_out = _synthetic_pairs(200, 0), _synthetic_pairs(100, 1)
    cfg = KamConfig(hidden=32, epochs=20, lr=5e-3, batch_pairs=16, seed=3)
    mlp, history = train_kam(train, cfg, use_names=False)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert len(history) == 20 and history[-1]["agree"] > 0.8
    model = KamModel(mlp, cfg, "id", use_names=False)
    hits = sum(int(model.scores(p.fi, p.fq, p.fp, None).argmax()) == p.target[0] for p in held_out)
    assert hits / len(held_out) > 0.8  # chance is ~1/5.5
    again, _ = train_kam(train, cfg, use_names=False)
    for a, b in zip(mlp.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    before = torch.rand(1)  # the global RNG is not reseeded by training
    assert not torch.equal(before, torch.rand(1))


def test_training_without_labels_is_a_clear_error():
    with pytest.raises(BicmError, match="no pseudo labels"):
        train_kam([], KamConfig())


def test_model_file_round_trip_and_backbone_check(tmp_path):
    mlp, _ = train_kam(_synthetic_pairs(20, 0), KamConfig(hidden=8, epochs=2), use_names=False)
    model = KamModel(mlp, KamConfig(hidden=8, epochs=2), "abc123", "tiny", use_names=False, info={"labels": 20})
    path = tmp_path / "kam.safetensors"
    model.save(path)
    loaded = KamModel.load(path)
    p = _synthetic_pairs(1, 5)[0]
    assert torch.equal(loaded.scores(p.fi, p.fq, p.fp, None), model.scores(p.fi, p.fq, p.fp, None))
    assert loaded.backbone_id == "abc123" and loaded.info["labels"] == 20 and loaded.fingerprint() == model.fingerprint()
    loaded.check_backbone("abc123")
    with pytest.raises(BicmError, match="trained on backbone tiny"):
        loaded.check_backbone("other", "ViT-B-32")
    other = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(BicmError, match="not a bicm KAM model"):
        KamModel.load(other)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BicmError, match="not a safetensors file"):
        KamModel.load(broken)
    with pytest.raises(BicmError, match="does not exist"):
        KamModel.load(tmp_path / "missing.safetensors")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), q=st.integers(1, 40), chunk=st.integers(1, 16), block=st.integers(1, 64), seed=st.integers(0, 999))
def test_best_queries_streams_to_the_brute_force_answer(n, q, chunk, block, seed):
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, 6, generator=g), dim=1)
    texts = F.normalize(torch.randn(q, 6, generator=g), dim=1)
    names = [str(i) for i in range(q)]

    def encode(batch):
        return texts[[int(t) for t in batch]]

    index, sims = best_queries(images, names, encode, chunk=chunk, max_block=block)
    full = images @ texts.T
    best = full.max(dim=1).values
    assert torch.allclose(full[torch.arange(n), index], best, atol=1e-6)  # float ties may pick either
    assert torch.allclose(sims, best, atol=1e-6)


# --------------------------------------------------------------------------------------
# Adapted inference (Eq. 11)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kam_for_tiny(tiny_backbone):
    torch.manual_seed(0)
    mlp = KamMLP(tiny_backbone.embed_dim, 16)
    with torch.no_grad():
        for bn in (mlp.net[1], mlp.net[4]):  # non-trivial running statistics
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return KamModel(mlp.eval(), KamConfig(hidden=16), tiny_backbone.fingerprint(), tiny_backbone.name)


def _named():
    from bicm.proposals import Proposals

    return Proposals(torch.tensor(SCENE_BOXES), class_names=list(SCENE_NAMES))


def test_kam_adds_lambda_k_times_its_score_to_the_fused_score(tiny_backbone, kam_for_tiny):
    image = draw_scene()
    base = Grounder(tiny_backbone)
    adapted = Grounder(tiny_backbone, kam=kam_for_tiny)
    assert adapted.config.components == ("qam", "com", "sf", "kam")
    r0 = base.ground(image, "a red square", _named())
    r1 = adapted.ground(image, "a red square", _named())
    c0, c1 = r0.candidates, r1.candidates
    assert torch.equal(c0.boxes, c1.boxes) and c1.s_kam is not None and c0.s_kam is None
    assert torch.allclose(c1.fused, c0.fused + c1.s_kam, atol=1e-6)
    # S_KAM is the MLP on [fi, fp_r, fc_r, fq] of each candidate, P_t included
    features = adapted.extract(image, ["a red square"], _named())
    fp, fc = adapted.candidate_features(features, 0)
    assert fp.shape == (len(c1), tiny_backbone.embed_dim) and fc is not None and fc.shape == fp.shape
    assert c1.qam_index == len(c1) - 1
    best = int(c1.s_cq[:-1].argmax())
    assert torch.equal(fc[-1], fc[best])  # P_t takes the class name of the best S_CQ proposal
    expected = kam_for_tiny.scores(features.image_feat, features.text[0], fp, fc)
    assert torch.allclose(c1.s_kam, expected)
    weighted = adapted.with_config(lambda_k=3.0).ground(image, "a red square", _named())
    assert torch.allclose(weighted.candidates.fused, c0.fused + 3.0 * c1.s_kam, atol=1e-5)
    assert "s_kam" in r1.to_dict()["candidates"][0]


def test_kam_refuses_another_backbone_and_needs_com(tiny_backbone, kam_for_tiny):
    other = make_backbone(seed=1)
    with pytest.raises(BicmError, match="trained on backbone"):
        Grounder(other, kam=kam_for_tiny)
    with pytest.raises(BicmError, match="add com"):
        BiCMConfig(components=("qam", "kam"))
    with pytest.raises(BicmError, match="needs a trained KAM model"):
        Grounder(tiny_backbone, BiCMConfig(components=("com", "kam")))


def test_kam_model_file_loads_into_the_grounder(tmp_path, tiny_backbone, kam_for_tiny):
    path = tmp_path / "kam.safetensors"
    kam_for_tiny.save(path)
    g = Grounder(tiny_backbone, kam=path)
    r = g.ground(draw_scene(), "a blue ball", _named())
    assert r.candidates.s_kam is not None
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["bicm_kam"])
    assert meta["backbone_id"] == tiny_backbone.fingerprint() and meta["config"]["hidden"] == 16


def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path):
    from bicm.interrupt import Interrupted

    pairs = _synthetic_pairs(60, 0)
    cfg = KamConfig(hidden=16, epochs=6, lr=5e-3, batch_pairs=16, seed=1)
    straight, straight_history = train_kam(pairs, cfg, use_names=False)
    state = tmp_path / "kam.state.pt"

    def stop_at_three(epoch, record):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="after epoch 3 of 6"):
        train_kam(pairs, cfg, use_names=False, on_epoch=stop_at_three, state=state)
    assert state.is_file()
    resumed_at: list[int] = []
    mlp, history = train_kam(pairs, cfg, use_names=False, state=state, on_resume=resumed_at.append)
    assert resumed_at == [3] and not state.exists()
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert [h["loss"] for h in history] == [h["loss"] for h in straight_history]
    for name, value in straight.state_dict().items():
        assert torch.equal(value, mlp.state_dict()[name]), name


def test_a_training_state_of_other_labels_or_settings_is_refused(tmp_path):
    from bicm.interrupt import Interrupted

    pairs = _synthetic_pairs(40, 0)
    cfg = KamConfig(hidden=16, epochs=4, lr=5e-3, batch_pairs=16)
    state = tmp_path / "kam.state.pt"
    with pytest.raises(Interrupted):
        train_kam(pairs, cfg, use_names=False, state=state, on_epoch=lambda e, r: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(BicmError, match=r"other settings \(lr\)"):
        train_kam(pairs, KamConfig(hidden=16, epochs=4, lr=1e-3, batch_pairs=16), use_names=False, state=state)
    with pytest.raises(BicmError, match=r"other settings \(pairs\)"):
        train_kam(_synthetic_pairs(40, 5), cfg, use_names=False, state=state)
    state.write_bytes(b"not a state")
    with pytest.raises(BicmError, match="cannot read the training state"):
        train_kam(pairs, cfg, use_names=False, state=state)
