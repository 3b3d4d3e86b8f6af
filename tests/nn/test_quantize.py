"""visgen's one VQ lookup: nearest codes against a direct computation, straight-through gradients, the
VQ loss values, LlamaGen's entropy loss, exact code lookup, and codes that do not depend on autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visgen.nn.quantize import VectorQuantizer, code_usage, entropy_loss, nearest_codes


def _z(shape=(2, 8, 5, 3), seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))  # (B, D, h, w)


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, D)


@pytest.mark.parametrize("l2", [False, True])
def test_codes_are_the_nearest_under_the_chosen_distance(l2: bool):
    vq = VectorQuantizer(64, 8, l2_normalized=l2, chunk_size=7)  # chunks of 7 rows: the loop is exercised
    torch.nn.init.normal_(vq.embedding.weight)
    z = _z()
    codes = vq(z).codes  # (B, h, w)
    flat, book = _flat(z), vq.embedding.weight.detach()
    if l2:  # LlamaGen: nearest unit code to the unit input = largest cosine similarity
        expected = (F.normalize(flat, dim=-1) @ F.normalize(book, dim=-1).t()).argmax(dim=1)
    else:
        expected = torch.cdist(flat, book).argmin(dim=1)
    assert torch.equal(codes.reshape(-1), expected)
    # The two lookups disagree on unnormalised inputs: the option changes behaviour, it is not cosmetic.
    cosine = (F.normalize(flat, dim=-1) @ F.normalize(book, dim=-1).t()).argmax(1)
    other = torch.cdist(flat, book).argmin(dim=1) if l2 else cosine
    assert not torch.equal(codes.reshape(-1), other)


def test_lookup_returns_exactly_the_vectors_the_decoder_saw():
    vq = VectorQuantizer(32, 8, l2_normalized=True)
    out = vq(_z())
    assert torch.equal(vq.lookup(out.codes), out.vectors)
    assert torch.allclose(out.vectors.norm(dim=1), torch.ones(()), atol=1e-6)  # unit codes when l2-normalised
    with pytest.raises(ValueError, match="outside this codebook"):
        vq.lookup(torch.full((1, 2, 2), 32))


def test_straight_through_passes_the_gradient_unchanged_to_the_encoder():
    vq = VectorQuantizer(16, 8)
    z = _z().requires_grad_(True)
    upstream = _z(seed=1)
    (vq(z).vectors * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)  # d vectors / d z = identity
    assert vq.embedding.weight.grad is None  # the decoder path does not train the codebook


def test_codebook_and_commitment_losses_have_vqvae_values_and_gradients():
    vq = VectorQuantizer(16, 8, beta=0.25)
    torch.nn.init.normal_(vq.embedding.weight)
    z = _z().requires_grad_(True)
    out = vq(z)
    chosen = vq.embedding.weight[out.codes.reshape(-1)]  # (N, D)
    sq = (chosen - _flat(z)).pow(2).mean()
    assert torch.allclose(out.codebook_loss, sq) and torch.allclose(out.commitment_loss, 0.25 * sq)
    assert out.entropy_loss.item() == 0.0 and torch.allclose(out.loss, 1.25 * sq)
    # codebook loss moves only the codes, commitment loss only the encoder output
    grad_z, grad_book = torch.autograd.grad(out.codebook_loss, [z, vq.embedding.weight], allow_unused=True)
    assert grad_z is None and grad_book.abs().sum() > 0
    grad_z, grad_book = torch.autograd.grad(out.commitment_loss, [z, vq.embedding.weight], allow_unused=True)
    assert grad_book is None and grad_z.abs().sum() > 0


def test_entropy_loss_matches_a_direct_computation_and_rewards_confident_spread_codes():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    p = (logits / 0.5).softmax(-1)
    direct = -(p * p.log()).sum(-1).mean() + (p.mean(0) * torch.log(p.mean(0) + 1e-5)).sum()
    assert torch.allclose(entropy_loss(logits, 0.5), direct, atol=1e-4)
    spread = torch.eye(10).repeat(5, 1) * 10  # each position sure of its code, all codes used
    collapsed = torch.zeros(50, 10)
    collapsed[:, 0] = 10  # every position on one code
    assert entropy_loss(spread, 0.1) < -2.0 < 0.0 <= entropy_loss(collapsed, 0.1) + 1e-3
    vq = VectorQuantizer(16, 8, entropy_weight=0.1)
    assert vq(_z()).entropy_loss.item() != 0.0


def test_codes_do_not_depend_on_autocast():
    vq = VectorQuantizer(512, 8, l2_normalized=True)
    z = _z((4, 8, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z.bfloat16())
    assert out.vectors.dtype == torch.float32
    assert torch.equal(out.codes, vq(z.bfloat16().float()).codes)


def test_code_usage_counts_every_code():
    counts = code_usage(torch.tensor([[0, 2], [2, 3]]), 5)
    assert counts.tolist() == [1, 0, 2, 1, 0]
    with pytest.raises(ValueError, match="outside the codebook"):
        code_usage(torch.tensor([5]), 5)


def test_nearest_codes_chunking_does_not_change_the_result():
    z, book = torch.randn(100, 4), torch.randn(30, 4)
    assert torch.equal(nearest_codes(z, book, chunk_size=9), nearest_codes(z, book, chunk_size=1000))


def test_restarted_codes_land_on_encoder_outputs_and_get_chosen():
    vq = VectorQuantizer(8, 4, l2_normalized=True)
    z = _z((2, 4, 4, 4))
    flat = vq.flatten(z)  # (32, 4) unit vectors
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[1, 5]] = True
    before = vq.embedding.weight.detach().clone()
    assert vq.restart_codes(dead, flat, torch.Generator().manual_seed(0)) == 2
    after = vq.embedding.weight.detach()
    assert torch.equal(after[~dead], before[~dead])
    for row in after[dead]:  # each moved code sits exactly on one encoder output, so that output now picks it
        assert (flat == row).all(dim=1).any()
    assert set(vq(z).codes.unique().tolist()) >= {1, 5}
