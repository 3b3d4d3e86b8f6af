"""Inception and DINOv2 feature paths: uint8 in, the network's own resize, exactly the reference code's features."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.eval.fakes import write_random_dinov2_weights
from visgen.eval.inception import INCEPTION_SHA256, InceptionFeatures


@pytest.fixture(scope="module")
def inception(inception_weights: Path) -> InceptionFeatures:
    return InceptionFeatures(inception_weights, expected_sha256=None)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_inception_features_are_torch_fidelitys_on_the_stored_pixels(inception, inception_weights, images) -> None:
    """pool/logits equal torch-fidelity's own extractor on the same uint8 images (no resize or cast before it);
    spatial features equal Mixed_6d.branch1x1's output recomputed layer by layer, first 7 channels, NHWC order."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(inception_weights))
    feats = inception(images)
    pool, logits = reference(images)
    assert torch.equal(feats["pool"], pool) and torch.equal(feats["logits"], logits)
    assert pool.std() > 0.1  # the random net still separates images

    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"]:
        x = getattr(reference, name)(x)
    spatial = reference.Mixed_6d.branch1x1(x)[:, :7]  # (2, 7, 17, 17): TF mixed_6/conv:0[..., :7]
    assert feats["spatial"].shape == (2, 2023)
    assert torch.allclose(feats["spatial"], spatial.permute(0, 2, 3, 1).reshape(2, -1), atol=1e-5)
    # 17 x 17 positions x 7 channels, channel fastest (NHWC): position (0, 1) channel 0 is element 7
    assert torch.allclose(feats["spatial"][:, 7], spatial[:, 0, 0, 1], atol=1e-5)

    # TF32 matmuls and bf16 autocast around the call change nothing, and the settings are restored after it
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_bf16 = inception(images)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert all(torch.equal(feats[k], under_bf16[k]) for k in feats)


class NotATensor(collections.UserDict):
    """A pickled class: weights_only refuses it, so a crafted file never reaches torch-fidelity's torch.load."""


def test_bad_inputs_and_weights_are_refused(inception, inception_weights, images, tmp_path) -> None:
    with pytest.raises(ValueError, match="expected uint8 images"):
        inception(images.float())
    with pytest.raises(ValueError, match=f"not {INCEPTION_SHA256}"):
        InceptionFeatures(inception_weights)  # random weights: not the published file
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        InceptionFeatures(tmp_path / "missing.pth")
    crafted = tmp_path / "crafted.pth"
    torch.save(NotATensor(a=1), crafted)
    with pytest.raises(ValueError, match="not a plain state dict"):
        InceptionFeatures(crafted, expected_sha256=None)


def test_dinov2_features_follow_edm2_and_the_hub_position_table(tmp_path, images) -> None:
    """timm DINOv2 from an official-layout file (518 px table, mask_token): the table resized with the hub's rule,
    edm2's resize and normalisation, the final-norm CLS token."""
    import timm

    from visgen.eval.dinov2 import DINOv2Features, hub_position_table

    path = write_random_dinov2_weights(tmp_path / "dinov2_vits14_pretrain.pth")
    dino = DINOv2Features(path, model_name="vit_small_patch14_dinov2")
    feats = dino(images)["dinov2"]
    assert feats.shape == (2, 384) and torch.isfinite(feats).all()

    state = torch.load(path, weights_only=True)
    table = state["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    hub = F.interpolate(table, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    assert torch.equal(hub_position_table(state["pos_embed"], 16)[:, 1:], hub.permute(0, 2, 3, 1).reshape(1, 256, -1))
    assert torch.equal(dino.net.pos_embed[:, 0], state["pos_embed"][:, 0])

    net = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0)
    state.pop("mask_token")
    state["pos_embed"] = hub_position_table(state["pos_embed"], 16)
    net.load_state_dict(state)
    x = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    assert torch.allclose(feats, net.eval()(x), atol=1e-5)
