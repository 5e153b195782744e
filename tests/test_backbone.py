"""Backbone: preprocessing equals open_clip's, exact text shortcut, every checkpoint format."""

from __future__ import annotations

import json
import warnings

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from bicm import BicmError, BicmWarning, Grounder
from bicm.backbone import encode_tokens, load_backbone
from bicm.checkpoints import save_checkpoint
from bicm.preprocess import PreprocessSpec, preprocess, preprocess_many

from .helpers import TINY_CFG, TINY_RESNET_CFG, draw_scene, make_backbone, make_model


def noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
@pytest.mark.parametrize("wh", [(320, 240), (240, 320), (64, 64), (37, 500), (5, 3), (101, 99)])
def test_preprocess_equals_open_clip_transform(mode, size, wh):
    spec = PreprocessSpec(size=size, resize_mode=mode)
    reference = image_transform_v2(PreprocessCfg(**spec.to_open_clip()), is_train=False)
    image = noise_image(*wh)
    ours, geometry = preprocess(image, spec)
    theirs = reference(image)
    assert ours.shape == theirs.shape == (3, *size)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert (geometry.input_height, geometry.input_width) == size


IMAGE_SIZES = [(320, 240), (240, 320), (64, 64), (37, 500), (5, 3), (101, 99), (700, 20), (1, 300)]


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
def test_preprocess_many_is_preprocess_in_one_batch(mode):
    spec = PreprocessSpec(size=(48, 80), resize_mode=mode)
    images = [noise_image(*wh, seed=i) for i, wh in enumerate(IMAGE_SIZES)]
    batch = preprocess_many(images, spec)
    assert batch.shape == (len(images), 3, 48, 80) and batch.is_contiguous()
    assert torch.equal(batch, torch.stack([preprocess(im, spec)[0] for im in images]))


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
def test_geometry_maps_original_pixels_onto_the_model_input(mode):
    spec = PreprocessSpec(size=(64, 64), resize_mode=mode, mean=(0, 0, 0), std=(1, 1, 1))
    image = Image.new("RGB", (320, 240), (0, 0, 0))
    image.paste((255, 255, 255), (140, 100, 180, 140))  # a white square, centre (160, 120)
    pixels, g = preprocess(image, spec)
    mass = pixels[0].clamp_min(0)
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    cx, cy = float((mass * xs).sum() / mass.sum()), float((mass * ys).sum() / mass.sum())
    assert cx == pytest.approx(160 * g.scale_x - g.left, abs=0.5)
    assert cy == pytest.approx(120 * g.scale_y - g.top, abs=0.5)


@pytest.mark.parametrize(
    "texts",
    [
        ["a red ball"],
        ["the bird on the left", "dog", "a man in a blue shirt riding a bicycle down the hill"],
        ["word " * 100],  # longer than the context: truncated
    ],
)
def test_trimmed_text_encoding_equals_full_context(texts):
    model = make_model()
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    tokens = tokenizer(texts)
    assert tokens.shape[1] == 77
    with torch.no_grad():
        full = model.encode_text(tokens)
        fast = encode_tokens(model, tokens)
    assert torch.allclose(fast, full, atol=1e-5)


def test_a_texts_embedding_does_not_depend_on_its_batch():
    # kernels block (and round) by the matrix shapes: without fixed shapes, a name encoded
    # with 39 others differs in its last bits from the same name alone (measured on ViT-B-32
    # and on this tiny tower)
    backbone = make_backbone()
    names = [f"object {i}" for i in range(40)] + ["a man in a blue shirt riding a bicycle", "dog", "the sky"]
    alone = torch.stack([backbone.encode_text([n])[0] for n in names])
    together = backbone.encode_text(names)
    shuffled = backbone.encode_text(names[::-1])[torch.arange(len(names) - 1, -1, -1)]
    assert torch.equal(together, alone)
    assert torch.equal(shuffled, alone)
    with torch.no_grad():  # and they are the model's own features
        reference = torch.nn.functional.normalize(backbone.model.encode_text(backbone.tokenize(names)), dim=-1)
    assert torch.allclose(together, reference, atol=1e-5)


def test_long_query_warns_about_truncation():
    backbone = make_backbone()
    with pytest.warns(BicmWarning, match="truncated"):
        backbone.encode_text(["word " * 100])


# ---------------------------------------------------------------------------------------
# Checkpoint formats: a random ViT-B-32 saved in each, loaded through the real path
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    # frozen like a loaded Backbone: torch picks its attention kernel by requires_grad, and
    # the two kernels differ in the last float bits
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def probe():
    image = draw_scene(224, 224)
    tokens = open_clip.tokenizer.SimpleTokenizer()(["a red ball", "the square on the left"])
    return image, tokens


def features(model, probe):
    image, tokens = probe
    spec = PreprocessSpec(size=(224, 224))
    with torch.no_grad():
        img = model.encode_image(preprocess(image, spec)[0][None])
        txt = model.encode_text(tokens)
    return img, txt


def backbone_features(backbone, probe):
    image, tokens = probe
    with torch.no_grad():
        img = backbone.model.encode_image(preprocess(image, backbone.spec)[0][None])
        txt = backbone.model.encode_text(tokens)
    return img, txt


def save_torchscript(model, path):
    """The OpenAI distribution format: a TorchScript archive with input_resolution & co."""
    import copy

    scripted_source = copy.deepcopy(model)
    scripted_source.register_buffer("input_resolution", torch.tensor(224))
    scripted_source.register_buffer("context_length_", torch.tensor(77))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(scripted_source), str(path))


@pytest.mark.slow
def test_checkpoint_formats_round_trip(vit_b32, probe, tmp_path):
    ref_img, ref_txt = features(vit_b32, probe)
    state = vit_b32.state_dict()

    files = {}
    files["open_clip.bin"] = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(state, files["open_clip.bin"])
    files["training.pt"] = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in state.items()}}, files["training.pt"])
    files["torchscript"] = tmp_path / "ViT-B-32.pt"
    save_torchscript(vit_b32, files["torchscript"])
    files["ours.safetensors"] = tmp_path / "ours.safetensors"
    cfg = dict(open_clip.get_model_config("ViT-B-32"), quick_gelu=True)
    save_checkpoint(vit_b32, files["ours.safetensors"], cfg, PreprocessSpec())
    hub = tmp_path / "hub"
    hub.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(hub / "open_clip_model.safetensors"))
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    files["hub folder"] = hub

    self_describing = {"torchscript", "ours.safetensors", "hub folder"}
    for label, path in files.items():
        if label in self_describing:
            with warnings.catch_warnings():
                warnings.simplefilter("error", BicmWarning)
                backbone = load_backbone(checkpoint=path, device="cpu")
        else:  # a bare state dict does not say which activation it was trained with
            with pytest.warns(BicmWarning, match="assuming QuickGELU"):
                backbone = load_backbone(checkpoint=path, device="cpu")
        img, txt = backbone_features(backbone, probe)
        assert torch.equal(img, ref_img), label
        assert torch.equal(txt, ref_txt), label
        assert backbone.spec.size == (224, 224), label

    # open_clip's own loader agrees on the plain state dict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = open_clip.create_model("ViT-B-32-quickgelu", pretrained=str(files["open_clip.bin"]))
    assert torch.equal(features(theirs.eval().requires_grad_(False), probe)[0], ref_img)

    # --model names the architecture explicitly
    backbone = load_backbone("ViT-B-32-quickgelu", checkpoint=files["open_clip.bin"], device="cpu")
    assert torch.equal(backbone_features(backbone, probe)[0], ref_img)


@pytest.mark.slow
def test_openai_state_dict_in_fp16_and_the_activation_question(vit_b32, probe, tmp_path):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in vit_b32.state_dict().items()}
    path = tmp_path / "random-vit-b-32.pt"
    torch.save(half, path)
    rounded = make_rounded(vit_b32, half)
    ref_img, ref_txt = features(rounded, probe)

    with pytest.warns(BicmWarning, match="assuming QuickGELU"):
        backbone = load_backbone(checkpoint=path, device="cpu")
    img, txt = backbone_features(backbone, probe)
    assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)

    with warnings.catch_warnings():
        warnings.simplefilter("error", BicmWarning)
        gelu = load_backbone(checkpoint=path, device="cpu", quick_gelu=False)
    img_gelu, _ = backbone_features(gelu, probe)
    assert not torch.allclose(img_gelu, ref_img, atol=1e-4)  # the wrong activation changes features


def make_rounded(model, half_state):
    import copy

    rounded = copy.deepcopy(model)
    rounded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half_state.items()})
    return rounded.eval()


def test_tiny_checkpoint_with_embedded_config(tiny_checkpoint):
    backbone = load_backbone(checkpoint=tiny_checkpoint, device="cpu")
    reference = make_model()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.model.encode_image(pixels), reference.encode_image(pixels))
    assert backbone.spec.size == (64, 64)
    assert backbone.model_cfg["quick_gelu"] is True


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint at all", "cannot read checkpoint"),
        (None, "checkpoint not found"),
    ],
)
def test_bad_checkpoint_files(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BicmError, match=message):
        load_backbone(checkpoint=path, device="cpu")


def test_checkpoint_of_another_architecture(tmp_path, tiny_checkpoint):
    with pytest.raises(BicmError, match="does not fit the architecture"):
        load_backbone("ViT-B-32", checkpoint=tiny_checkpoint, device="cpu")


def test_custom_text_checkpoint_in_the_old_text_layout(tmp_path):
    """A CustomTextCLIP whose text tower was saved in the old flat layout (``positional_embedding``
    rather than ``text.positional_embedding``) loads, by open_clip's own conversion."""
    from safetensors.torch import save_file

    cfg = dict(TINY_CFG, custom_text=True)
    torch.manual_seed(0)
    reference = open_clip.CustomTextCLIP(**TINY_CFG).eval().requires_grad_(False)  # as a Backbone keeps it
    flat = ("text_projection", "positional_embedding", "token_embedding", "transformer", "ln_final")
    old = {(k[len("text.") :] if k.startswith("text.") and k[len("text.") :].startswith(flat) else k): v
           for k, v in reference.state_dict().items()}
    assert "positional_embedding" in old and "text.positional_embedding" not in old
    path = tmp_path / "old-layout.safetensors"
    save_file({k: v.contiguous() for k, v in old.items()}, str(path), metadata={"open_clip_config": json.dumps({"model_cfg": cfg})})
    backbone = load_backbone(checkpoint=path, device="cpu")
    assert isinstance(backbone.model, open_clip.CustomTextCLIP)
    pixels, tokens = torch.randn(2, 3, 64, 64), backbone.tokenizer(["a red ball", "the blue square"])
    with torch.no_grad():
        assert torch.equal(backbone.model.encode_image(pixels), reference.encode_image(pixels))
        assert torch.equal(backbone.model.encode_text(tokens), reference.encode_text(tokens))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused(tmp_path):
    import pickle

    path = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path.write_bytes(pickle.dumps({"weight": Evil()}))
    with pytest.raises(BicmError, match="cannot read checkpoint"):
        load_backbone(checkpoint=path, device="cpu")


def test_offline_pretrained_tag_says_how_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(BicmError, match="--checkpoint PATH"):
        load_backbone("ViT-B-32", "openai", device="cpu", cache_dir="/nonexistent-cache")


def test_unknown_architecture_and_tag():
    with pytest.raises(BicmError, match="unknown model architecture"):
        load_backbone("ViT-Z-99", "openai", device="cpu")
    with pytest.raises(BicmError, match="unknown pretrained tag"):
        load_backbone("ViT-B-32", "no-such-tag", device="cpu")


def test_device_and_precision_options():
    with pytest.raises(BicmError, match="fp16 \\(autocast\\) needs a CUDA"):
        load_backbone("ViT-B-32", "openai", device="cpu", amp="fp16")
    with pytest.raises(BicmError, match="unknown device"):
        load_backbone("ViT-B-32", "openai", device="tpu")


def test_bf16_autocast_stays_close_to_fp32():
    backbone = make_backbone()
    image = draw_scene()
    fp32 = backbone.encode_images([image])
    backbone.amp = torch.bfloat16
    try:
        bf16 = backbone.encode_images([image])
    finally:
        backbone.amp = None
    assert bf16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99


def test_resnet_clip_refuses_qam_but_runs_com():
    backbone = make_backbone(TINY_RESNET_CFG)
    with pytest.raises(BicmError, match="QAM needs a ViT"):
        Grounder(backbone)
    grounder = Grounder(backbone, Grounder(make_backbone()).config.replace(components=("com",)))
    result = grounder.ground(draw_scene(), "a red square", [[20, 30, 91, 101], [200, 120, 281, 201]])
    assert result.box in [(20.0, 30.0, 91.0, 101.0), (200.0, 120.0, 281.0, 201.0)]
    assert result.attention is None and result.qam_box is None
