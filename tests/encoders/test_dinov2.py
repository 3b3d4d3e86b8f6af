"""DINOv2 through timm from local files: hub and timm layouts, REPA's pos-embed resampling and preprocessing,
frozen and invisible to state_dict/parameters, identified by its file's hash; bad files refused."""

from __future__ import annotations

import hashlib

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from visgen.encoders import DINOv2Encoder

TINY = {"depth": 1, "embed_dim": 48, "num_heads": 2}  # a ViT-S/14-shaped DINOv2 cut down for tests


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """One tiny DINOv2 at its release resolution (518 px: a 37 x 37 grid), saved as torch.hub and timm save it."""
    root = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    release = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0, **TINY)
    with torch.no_grad():
        release.pos_embed.normal_()
        for block in release.blocks:  # layer scale starts at 1e-5: make the blocks matter
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)
    state = {k: v.clone() for k, v in release.state_dict().items()}
    hub = dict(state, mask_token=torch.zeros(1, 48))  # torch.hub's file also holds DINOv2's iBOT mask token
    torch.save(hub, root / "dinov2_vits14_pretrain.pth")
    (root / "timm").mkdir()
    save_file(state, str(root / "timm" / "model.safetensors"))
    return {"root": root, "state": state}


def build(path, **kwargs) -> DINOv2Encoder:
    return DINOv2Encoder(str(path), size="s", model_kwargs=TINY, **kwargs)


def test_hub_and_timm_files_load_to_the_same_encoder_with_repas_resampled_positions(files):
    hub = build(files["root"] / "dinov2_vits14_pretrain.pth")
    from_dir = build(files["root"] / "timm")  # an `hf download --local-dir` directory
    expected = resample_abs_pos_embed(files["state"]["pos_embed"], [16, 16])  # REPA's call: bicubic, antialias
    torch.testing.assert_close(hub.frozen_net.pos_embed, expected, rtol=0, atol=0)
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    tokens = hub(images)
    assert tokens.shape == (2, 256, 48) and hub.token_grid == 16 and hub.embed_dim == 48
    torch.testing.assert_close(from_dir(images), tokens, rtol=0, atol=0)
    assert build(files["root"] / "timm", image_size=512)(torch.zeros(1, 3, 512, 512)).shape == (1, 1024, 48)


def test_features_are_the_normed_patch_tokens_of_repas_preprocessing(files):
    encoder = build(files["root"] / "dinov2_vits14_pretrain.pth")
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    x = ((images + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate(x, 224, mode="bicubic")  # REPA: normalise, then resize to 224
    expected = encoder.frozen_net.forward_features(x)[:, 1:]  # x_norm_patchtokens: no class token
    torch.testing.assert_close(encoder(images), expected)
    with pytest.raises(ValueError, match=r"expected \(B, 3, 256, 256\)"):
        encoder(torch.zeros(1, 3, 224, 224))


def test_the_encoder_is_frozen_and_invisible_to_state_dict_and_parameters(files):
    path = files["root"] / "dinov2_vits14_pretrain.pth"
    encoder = build(path)
    assert list(encoder.parameters()) == [] and encoder.state_dict() == {}
    assert all(not p.requires_grad for p in encoder.frozen_net.parameters())
    encoder.train()
    assert not encoder.frozen_net.training
    images = torch.rand(1, 3, 256, 256, requires_grad=True)
    assert not encoder(images).requires_grad  # no graph: no gradient can reach it
    assert encoder.id == "dinov2-vits14@sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_missing_and_mismatched_files_are_refused_with_the_fix(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download timm/vit_small_patch14_dinov2"):
        build(tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match="not a DINOv2 ViT-S/14 file"):
        DINOv2Encoder(str(files["root"] / "timm"), size="s", model_kwargs={**TINY, "depth": 2})
    with pytest.raises(ValueError, match="image_size=250 is not a multiple of 16"):
        build(files["root"] / "timm", image_size=250)
