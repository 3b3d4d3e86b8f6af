"""MaskGIT's training loss: masking, label drop, the two cross-entropies, and a tiny run that learns and samples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visgen.nn.maskgit import MaskTransformer
from visgen.paradigms.maskgit import MaskGIT
from visgen.paradigms.maskgit_sampler import MaskGITSampler, random_mask
from visgen.tokenizers.base import PixelTokenizer, Tokenizer

V, C, SIDE = 8, 4, 4  # codebook, classes, code grid side


class CodesTokenizer(Tokenizer):
    """A stand-in VQ tokenizer: the batch already holds codes."""

    vocab_size = V

    @property
    def id(self) -> str:
        return "codes"

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        return (SIDE, SIDE)

    def encode(self, images):
        return images

    def sample(self, moments, generator=None):
        return moments

    def decode(self, latents):
        return latents.float()


class Recorder(nn.Module):
    """Fixed logits (N, V+1) whatever the input; records what it was given."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(SIDE * SIDE, V + 1, generator=torch.Generator().manual_seed(0)))
        self.codebook_size, self.mask_token_id, self.num_classes = V, V, C
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, codes, labels):
        self.seen.append((codes.clone(), labels.clone()))
        return self.logits.expand(codes.shape[0], -1, -1)


def module(net: nn.Module, tokenizer: Tokenizer | None = None, **kw) -> MaskGIT:
    return MaskGIT(net=net, tokenizer=tokenizer or CodesTokenizer(), sampler=MaskGITSampler(num_steps=4),
                   optimizer={"lr": 1e-3}, image_size=SIDE, batch_global=8, **kw)


def batch_of(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, V, (n, SIDE, SIDE), generator=g)
    return {"latents": codes, "labels": torch.randint(0, C, (n,), generator=g)}


def test_masked_positions_get_the_mask_id_at_the_scheduled_rate():
    net = Recorder()
    batch = batch_of(4096)
    module(net, label_drop_prob=0.0).loss(net, batch, torch.Generator().manual_seed(1))
    codes, _ = net.seen[0]
    g = torch.Generator().manual_seed(1)
    torch.rand(4096, generator=g)  # the label-drop draw comes first
    mask = random_mask(batch["latents"], "arccos", g)
    assert torch.equal(codes, batch["latents"].masked_fill(mask, V))
    assert abs(mask.float().mean().item() - 2 / math.pi) < 0.01  # E[arccos(r) / (pi/2)] = 2/pi for r ~ U[0, 1)


@pytest.mark.parametrize(("prob", "expected"), [(0.0, 0.0), (1.0, 1.0), (0.1, 0.1)])
def test_labels_drop_to_the_null_class_at_the_configured_rate(prob, expected):
    net = Recorder()
    module(net, label_drop_prob=prob).loss(net, batch_of(4000), torch.Generator().manual_seed(2))
    _, labels = net.seen[0]
    assert abs((labels == C).float().mean().item() - expected) < 0.015


def test_all_token_loss_is_label_smoothed_cross_entropy_over_codes_and_mask():
    net = Recorder()
    batch = batch_of(16)
    loss = module(net, loss_on="all", label_smoothing=0.1).loss(net, batch, torch.Generator().manual_seed(3))
    log_p = net.logits.log_softmax(-1)  # (N, V+1): the mask column shares the smoothing mass, as in v1
    targets = batch["latents"].view(16, -1)  # (B, N)
    nll = -log_p.gather(1, targets.T).T  # (B, N)
    expected = (0.9 * nll + 0.1 * -log_p.mean(-1)).mean(1)  # (1 - eps) CE + eps * uniform CE over V + 1 classes
    assert loss.shape == (16,) and torch.allclose(loss, expected, atol=1e-5)


def test_masked_token_loss_averages_over_the_masked_tokens_of_the_batch():
    net = Recorder()
    batch = batch_of(16)
    loss = module(net, loss_on="masked", label_smoothing=0.0).loss(net, batch, torch.Generator().manual_seed(4))
    codes, _ = net.seen[0]
    masked = (codes == V).view(16, -1)
    nll = F.cross_entropy(net.logits.expand(16, -1, -1).flatten(0, 1), batch["latents"].flatten(),
                          reduction="none").view(16, -1)
    assert torch.allclose(loss.mean(), nll[masked].mean(), atol=1e-5)  # the token mean over masked positions only
    unmasked_only = masked.sum(1) == 0
    assert (loss[unmasked_only] == 0).all()


def test_a_continuous_tokenizer_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="vocab_size=None and model.net.codebook_size=8.*VQ model/tokenizer"):
        module(Recorder(), tokenizer=PixelTokenizer())


def test_a_tiny_maskgit_learns_class_patterns_and_decodes_them():
    torch.manual_seed(0)
    # Class c's codes are (c + position) mod V: a deterministic image per class.
    pattern = (torch.arange(C).view(C, 1) + torch.arange(SIDE * SIDE).view(1, -1)) % V  # (C, N)
    net = MaskTransformer(input_size=SIDE, codebook_size=V, num_classes=C, hidden_size=64, depth=2, num_heads=4,
                          mlp_dim=128, dropout=0.0, embed_init_std=0.02)
    paradigm = module(net, loss_on="masked", label_smoothing=0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        labels = torch.randint(0, C, (32,))
        loss = paradigm.loss(net, {"latents": pattern[labels].view(32, SIDE, SIDE), "labels": labels}).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.2 * sum(losses[:10]) / 10
    labels = torch.arange(C).repeat(4)
    codes = MaskGITSampler(num_steps=4, cfg_scale=1.0)(net.eval(), labels, (SIDE, SIDE),
                                                        generator=torch.Generator().manual_seed(0))
    assert (codes.view(len(labels), -1) == pattern[labels]).float().mean() > 0.95
