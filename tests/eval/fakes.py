"""Randomly initialised stand-ins, in the official file formats, for weights the tests cannot download."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """A state dict in torch-fidelity's `weights-inception-2015-12-05-*.pth` layout, random but well scaled.

    The net is built without its download (patched out), then its batch-norm statistics are calibrated on random
    images so that activations keep unit scale through the 90-odd layers (with BN's default mean 0 / var 1 and
    PyTorch's default conv init they would shrink ~3x per layer and the features would be all but zero).
    """
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with torch.random.fork_rng(), mock.patch.object(fe, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict"):
        torch.manual_seed(seed)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average: one pass sets the statistics of this batch
        net.train()
        with torch.no_grad():
            net(images)
        torch.nn.init.normal_(net.fc.weight, std=0.05)
        torch.nn.init.normal_(net.fc.bias, std=0.05)
    torch.save(net.state_dict(), path)
    return path


def write_random_dinov2_weights(path: Path, model_name: str = "vit_small_patch14_dinov2", seed: int = 0) -> Path:
    """A state dict in the official DINOv2 hub layout (518 px position table, `mask_token`), random weights."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = timm.create_model(model_name, pretrained=False, num_classes=0)  # img_size 518: 37 x 37 patches
        state = net.state_dict()
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    # DINOv2's position table is smooth; random noise would hide interpolation mistakes less well
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, -1)
    coords = torch.linspace(-1, 1, 37)
    smooth = torch.sin(3 * coords[:, None, None] + torch.arange(grid.shape[-1]) * 0.01) * torch.cos(
        2 * coords[None, :, None])
    state["pos_embed"][:, 1:] = smooth.reshape(1, 37 * 37, -1)
    torch.save(state, path)
    return path
