"""MAR's net: official counts and strict loading, orders and masks, the masked-only loss, weight-decay groups."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from visgen.nn.mar import MAR, truncated_normal_ratio
from visgen.official import _build_on_meta, compose_experiment, load_official
from visgen.training.module import param_groups

MANIFESTS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "manifests"
needs_manifests = pytest.mark.skipif(not (MANIFESTS / "_index.json").is_file(),
                                     reason=f"reference manifests not found at {MANIFESTS}")
RELEASES = {"mar_b": ("mar_mar_base_dl6w1024", 207_924_768), "mar_l": ("mar_mar_large_dl8w1280", 478_326_304),
            "mar_h": ("mar_mar_huge_dl12w1536", 942_403_104)}



@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: the tensors are tiny and the shared CPUs make extra threads slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_mar(**overrides) -> MAR:
    """A small MAR on 4x4x3 latents (16 tokens), 10 classes."""
    kwargs = dict(input_size=4, in_channels=3, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, num_classes=10, buffer_size=4,
                  diffloss_d=2, diffloss_w=32, num_sampling_steps=10)
    return MAR(**{**kwargs, **overrides})


@needs_manifests
@pytest.mark.parametrize("experiment", sorted(RELEASES))
def test_presets_have_the_official_counts_and_the_released_layout(experiment: str) -> None:
    manifest, count = RELEASES[experiment]
    net = _build_on_meta(compose_experiment(experiment))
    assert sum(p.numel() for p in net.parameters()) == count
    index = json.loads((MANIFESTS / "_index.json").read_text())[f"mar/{manifest[4:]}"]
    assert index["n_params"] == count
    diffloss = sum(p.numel() for n, p in net.named_parameters() if n.startswith("diffloss."))
    assert diffloss == index["diffloss_params"]
    layout = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert layout == json.loads((MANIFESTS / f"{manifest}.json").read_text())


@needs_manifests
def test_released_checkpoint_loads_strictly_taking_the_ema(tmp_path: Path) -> None:
    shapes = json.loads((MANIFESTS / "mar_mar_base_dl6w1024.json").read_text())
    # One stored value per tensor, expanded (cheap on disk); EMA and raw weights differ everywhere.
    ema = {k: torch.full((), float(i)).expand(s) for i, (k, s) in enumerate(shapes.items())}
    raw = {k: torch.full((), -1.0 - i).expand(s) for i, (k, s) in enumerate(shapes.items())}
    torch.save({"model": raw, "model_ema": ema, "epoch": 399}, tmp_path / "checkpoint-last.pth")
    net = load_official("mar_b", tmp_path / "checkpoint-last.pth")
    state = net.state_dict()
    assert set(state) == set(ema)
    assert all(torch.equal(state[k], ema[k]) for k in ema)


def test_orders_are_permutations_and_masks_have_the_rounded_up_count() -> None:
    net = tiny_mar()
    gen = torch.Generator().manual_seed(0)
    orders = net.sample_orders(8, gen)  # (8, 16)
    assert torch.equal(orders.sort(dim=1).values, torch.arange(16).expand(8, 16))
    assert len({tuple(o.tolist()) for o in orders}) == 8
    tokens = torch.zeros(8, 16, 3)
    for rate in (0.7, 0.71, 0.93, 1.0):
        mask = net.random_masking(tokens, orders, mask_rate=rate)  # (8, 16)
        assert mask.sum(dim=1).tolist() == [math.ceil(16 * rate)] * 8  # official: int(np.ceil(L * rate))
        first = orders[:, : math.ceil(16 * rate)]
        assert bool(mask.gather(1, first).eq(1).all())  # the first positions of each order are the masked ones


def test_mask_ratio_is_the_truncated_normal() -> None:
    from scipy import stats

    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([truncated_normal_ratio(gen, "cpu") for _ in range(4000)])
    assert float(draws.min()) >= 0.7 and float(draws.max()) <= 1.0
    ref = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    assert abs(float(draws.mean()) - ref.mean()) < 4 * ref.std() / math.sqrt(4000)
    assert abs(float(draws.std()) - ref.std()) < 0.05 * ref.std()


def test_loss_counts_masked_tokens_only() -> None:
    net = tiny_mar().eval()  # no dropout: the same draws give the same loss
    x = torch.randn(4, 16, 3)
    orders = net.sample_orders(4, torch.Generator().manual_seed(1))
    mask = net.random_masking(x, orders, mask_rate=0.75)  # (4, 16): 12 masked per row
    z = torch.randn(4, 16, 32)
    base = net.forward_loss(z, x, mask, torch.Generator().manual_seed(2))  # (4,)
    known, unknown = (mask == 0), (mask == 1)
    moved_known = net.forward_loss(z, x + 5.0 * known[..., None], mask, torch.Generator().manual_seed(2))
    moved_unknown = net.forward_loss(z, x + 5.0 * unknown[..., None], mask, torch.Generator().manual_seed(2))
    assert torch.allclose(base, moved_known)  # targets of known tokens do not enter the loss
    assert not torch.allclose(base, moved_unknown)
    # The batch mean is the official (loss * mask).sum() / mask.sum() over the 4 copies of each token.
    per_token = net.diffloss(x.reshape(64, 3).repeat(4, 1), z.reshape(64, 32).repeat(4, 1),
                             torch.Generator().manual_seed(2))  # (256,)
    flat = mask.reshape(64).repeat(4)
    assert torch.allclose(base.mean(), (per_token * flat).sum() / flat.sum())


def test_encoder_sees_known_tokens_only_and_null_labels_use_the_fake_latent() -> None:
    net = tiny_mar().eval()
    x = torch.randn(2, 16, 3)
    mask = net.random_masking(x, net.sample_orders(2, torch.Generator().manual_seed(0)), mask_rate=0.75)
    labels = torch.tensor([3, 10])
    enc = net.forward_mae_encoder(x, mask, labels)
    assert enc.shape == (2, 4 + 4, 32)  # buffer + 4 known tokens
    z = net.forward_mae_decoder(enc, mask)
    z2 = net.forward_mae_decoder(net.forward_mae_encoder(x + 3.0 * mask[..., None], mask, labels), mask)
    assert torch.allclose(z, z2, atol=1e-6)  # unknown token values never reach the net
    assert torch.equal(net.class_embedding(labels)[1], net.fake_latent[0])


def test_weight_decay_skips_biases_1d_params_and_the_whole_diffloss() -> None:
    net = tiny_mar()
    decay, no_decay = param_groups(net, 0.02, 2)
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert "encoder_blocks.0.attn.qkv.weight" in decayed and "fake_latent" in decayed
    assert not any(n.startswith("diffloss.") or n.endswith(".bias") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = tiny_mar(attn_dropout=0.0, proj_dropout=0.0)
    ckpt = tiny_mar(attn_dropout=0.0, proj_dropout=0.0, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 3)
    mask = plain.random_masking(x, plain.sample_orders(2, torch.Generator().manual_seed(0)), mask_rate=0.8)
    for net in (plain, ckpt):
        net(x, torch.tensor([1, 2]), mask, torch.Generator().manual_seed(3)).mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
