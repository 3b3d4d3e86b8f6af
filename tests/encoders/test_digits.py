"""The label-free digits encoder: SimCLR's loss against a direct computation, views, a cache that trains once and
never reads labels, and an 8 x 8 grid of frozen fp32 features."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from visgen.encoders import digits as D


def test_nt_xent_is_the_cross_entropy_of_each_views_partner_among_the_other_views():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    expected = 0.0
    for i in range(8):
        partner = (i + 4) % 8
        others = [j for j in range(8) if j != i]
        logits = torch.stack([z[i] @ z[j] / 0.5 for j in others])
        expected += -(logits[others.index(partner)] - torch.logsumexp(logits, 0)) / 8
    torch.testing.assert_close(D.nt_xent_loss(z1, z2, 0.5), expected)
    assert D.nt_xent_loss(z1, z1 + 0.01, 0.5) < D.nt_xent_loss(z1, z2, 0.5)  # matching views score lower


def test_views_are_seeded_digits_of_the_same_shape_and_range():
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    a = D.augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, D.augment(images, torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, D.augment(images, torch.Generator().manual_seed(2)))


def test_the_encoder_trains_once_without_labels_and_is_then_read_from_the_cache(tmp_path, monkeypatch):
    from visgen.data import stream

    def no_labels(shards, image_size, num_classes=None):  # the encoder must work with labels it cannot read
        return torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), None

    monkeypatch.setattr(stream, "load_all", no_labels)
    monkeypatch.setattr("visgen.eval.classifier.dataset_key", lambda a, b: "key")
    monkeypatch.setitem(D.RECIPE, "epochs", 1)
    monkeypatch.setitem(D.RECIPE, "batch", 32)
    encoder = D.DigitsEncoder("unused-train-shards", str(tmp_path))
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["labels_used"] is False and meta["num_train"] == 64 and meta["recipe"]["method"] == "simclr"
    monkeypatch.setattr(D, "train_digits_encoder", lambda *a: pytest.fail("retrained despite the cache"))
    again = D.DigitsEncoder("unused-train-shards", str(tmp_path))
    assert again.id == encoder.id and encoder.id.startswith("digits-simclr-cnn-r1@sha256:")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = encoder(images)
    assert tokens.shape == (2, 64, 64) and tokens.dtype == torch.float32 and encoder.token_grid == 8
    torch.testing.assert_close(tokens, again(images))
    assert list(encoder.parameters()) == [] and not encoder.frozen_net.training
