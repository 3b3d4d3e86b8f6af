"""MAR's network (Li et al., NeurIPS 2024, "Autoregressive Image Generation without Vector Quantization").

An MAE-style encoder/decoder (Sec. 3.4, "Masked autoregressive models") over continuous tokens, plus the per-token
Diffusion Loss head (`visgen.nn.diffloss`):

* tokens: the KL-16 latents (16, 16, 16) patchified with patch 1 -> 256 tokens of dim 16 (`patchify`);
* `buffer_size` (64) leading buffer slots hold the class embedding (a learned `fake_latent` for the null class
  `num_classes`, i.e. the unconditional half of CFG and the 10% label drop in training);
* a random generation order per image (`sample_orders`) and one mask ratio per batch from a truncated normal on
  [0.7, 1.0] with mean 1.0 and σ 0.25, the count rounded up (`random_masking`);
* the encoder sees only the known tokens (masked ones are dropped from its sequence); the decoder pads the masked
  positions with `mask_token`; learned encoder, decoder and diffusion position embeddings;
* the decoder output z at each position conditions the DiffLoss on that token; the loss counts masked tokens only.

Parameter names are the official `models/mar.py` ones, so released checkpoints load without renaming
(`register_official` below: the EMA lives under "model_ema"). Counts with DiffLoss (manifests): MAR-B 207,924,768,
MAR-L 478,326,304, MAR-H 942,403,104.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from visgen.nn.attention import ViTBlock
from visgen.nn.diffloss import DiffLoss
from visgen.official import OfficialFormat, register_official

__all__ = ["MAR", "mask_by_order", "truncated_normal_ratio"]


def truncated_normal_ratio(generator: torch.Generator | None, device: torch.device | str, low: float = 0.7,
                           mean: float = 1.0, std: float = 0.25, high: float = 1.0) -> float:
    """One draw of N(mean, std²) truncated to [low, high] by inverting its CDF (scipy's `truncnorm` as MAR uses
    it: `truncnorm((low - 1) / 0.25, 0, loc=1, scale=0.25)`), from `generator`."""
    a = torch.tensor((low - mean) / std, dtype=torch.float64)
    b = torch.tensor((high - mean) / std, dtype=torch.float64)
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64).cpu()
    cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
    return float(mean + std * torch.special.ndtri(cdf_a + u * (cdf_b - cdf_a)))


def mask_by_order(mask_len: int, orders: Tensor) -> Tensor:
    """(B, L) bool mask of the first `mask_len` positions of each row's order (B, L)."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)  # (B, L)
    return mask.scatter(1, orders[:, :mask_len], True)  # (B, L)


class MAR(nn.Module):
    """MAE encoder/decoder producing the per-token conditions z, and `diffloss`, the per-token diffusion head."""

    def __init__(
        self,
        input_size: int = 16,
        in_channels: int = 16,
        patch_size: int = 1,
        encoder_embed_dim: int = 768,
        encoder_depth: int = 12,
        encoder_num_heads: int = 12,
        decoder_embed_dim: int = 768,
        decoder_depth: int = 12,
        decoder_num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        buffer_size: int = 64,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        mask_ratio_min: float = 0.7,
        diffloss_d: int = 6,
        diffloss_w: int = 1024,
        num_sampling_steps: int = 100,
        diffusion_batch_mul: int = 4,
        grad_checkpointing: bool = False,
    ):
        """Sizes as the official `mar_base/large/huge`; `input_size` is the latent grid side (256 px / 16)."""
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"model.net.input_size={input_size} is not a multiple of patch_size={patch_size}")
        if not 0.0 < mask_ratio_min <= 1.0:
            raise ValueError(f"model.net.mask_ratio_min must be in (0, 1], got {mask_ratio_min}")
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.seq_h = self.seq_w = input_size // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = in_channels * patch_size**2
        self.num_classes = num_classes
        self.buffer_size = buffer_size
        self.mask_ratio_min = mask_ratio_min
        self.diffusion_batch_mul = diffusion_batch_mul
        self.grad_checkpointing = grad_checkpointing

        # Class embedding; the null class (index num_classes) is the learned fake latent.
        self.class_emb = nn.Embedding(num_classes, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))
        # Encoder.
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList([
            ViTBlock(encoder_embed_dim, encoder_num_heads, mlp_ratio, attn_drop=attn_dropout, proj_drop=proj_dropout)
            for _ in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        # Decoder.
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            ViTBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio, attn_drop=attn_dropout, proj_drop=proj_dropout)
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))
        self.initialize_weights()
        # The per-token diffusion head (its own initialisation).
        self.diffloss = DiffLoss(self.token_embed_dim, decoder_embed_dim, diffloss_d, diffloss_w, num_sampling_steps,
                                 grad_checkpointing)

    def initialize_weights(self) -> None:
        """Official init: N(0, 0.02) embeddings and tokens, xavier-uniform linears, unit LayerNorms."""
        for param in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                      self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides biases and 1-D ones: the whole DiffLoss (official
        `util/misc.py add_weight_decay`: `'diffloss' in name`)."""
        return {name for name, _ in self.named_parameters() if name.startswith("diffloss.")}

    # ----- tokens <-> latents ------------------------------------------------------------------------------------
    def patchify(self, x: Tensor) -> Tensor:
        """Latents (B, C, H, W) -> tokens (B, L, C·p²), channel-major inside a patch (official order)."""
        b, c, h, w = x.shape
        if c != self.in_channels or h != self.input_size or w != self.input_size:
            raise ValueError(f"MAR built for latents ({self.in_channels}, {self.input_size}, {self.input_size}) got "
                             f"{tuple(x.shape[1:])}; set model.net.in_channels / input_size to the tokenizer's "
                             "latent shape")
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, h, p, w, p)
        return torch.einsum("nchpwq->nhwcpq", x).reshape(b, self.seq_len, self.token_embed_dim)  # (B, L, D)

    def unpatchify(self, x: Tensor) -> Tensor:
        """Tokens (B, L, C·p²) -> latents (B, C, H, W)."""
        b, p = x.shape[0], self.patch_size
        x = x.reshape(b, self.seq_h, self.seq_w, self.in_channels, p, p)  # (B, h, w, C, p, p)
        return torch.einsum("nhwcpq->nchpwq", x).reshape(b, self.in_channels, self.input_size, self.input_size)

    # ----- masking ---------------------------------------------------------------------------------------------
    def sample_orders(self, bsz: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Tensor:
        """A random generation order per image: (B, L) int64, each row a permutation of 0..L−1."""
        device = device if device is not None else self.fake_latent.device
        keys = torch.rand(bsz, self.seq_len, generator=generator, device=device)  # (B, L)
        return keys.argsort(dim=1)  # (B, L)

    def random_masking(self, x: Tensor, orders: Tensor, generator: torch.Generator | None = None,
                       mask_rate: float | None = None) -> Tensor:
        """(B, L) float mask (1 = masked) of the first ⌈L · r⌉ positions of each order; one r per batch drawn from
        the truncated normal on [mask_ratio_min, 1] (or `mask_rate`)."""
        if mask_rate is None:
            mask_rate = truncated_normal_ratio(generator, x.device, low=self.mask_ratio_min)
        num_masked = int(math.ceil(self.seq_len * mask_rate))
        return mask_by_order(num_masked, orders).to(x.dtype)  # (B, L)

    # ----- encoder / decoder -----------------------------------------------------------------------------------
    def class_embedding(self, labels: Tensor) -> Tensor:
        """(B,) labels in [0, num_classes] -> (B, D_enc); the null class `num_classes` is the fake latent."""
        null = labels == self.num_classes  # (B,)
        if self.num_classes == 0:
            return self.fake_latent.expand(labels.shape[0], -1)  # (B, D)
        emb = self.class_emb(labels.clamp(max=self.num_classes - 1))  # (B, D)
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype), emb)  # (B, D)

    def _run(self, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        """Apply `blocks` in turn, through activation checkpointing when enabled and training."""
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_mae_encoder(self, x: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """Tokens (B, L, D_tok), mask (B, L) (1 = unknown), labels (B,) -> encoded known tokens (B, K + buffer, D)."""
        x = self.z_proj(x)  # (B, L, D)
        bsz, _, dim = x.shape
        buffer = self.class_embedding(labels).to(x.dtype)[:, None].expand(bsz, self.buffer_size, dim)  # (B, S, D)
        x = torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned  # (B, S + L, D)
        x = self.z_proj_ln(x)
        keep = torch.cat([mask.new_zeros(bsz, self.buffer_size), mask], dim=1) == 0  # (B, S + L) bool
        kept = keep.sum(dim=1)  # (B,)
        if bool((kept != kept[0]).any()):
            raise ValueError("MAR's encoder needs the same number of masked tokens in every row of a batch")
        x = x[keep].reshape(bsz, -1, dim)  # (B, S + K, D): masked tokens dropped
        return self.encoder_norm(self._run(self.encoder_blocks, x))  # (B, S + K, D)

    def forward_mae_decoder(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encoded known tokens (B, S + K, D_enc), mask (B, L) -> per-position conditions z (B, L, D_dec)."""
        x = self.decoder_embed(x)  # (B, S + K, D)
        bsz, _, dim = x.shape
        keep = torch.cat([mask.new_zeros(bsz, self.buffer_size), mask], dim=1) == 0  # (B, S + L) bool
        padded = self.mask_token.to(x.dtype).expand(bsz, keep.shape[1], dim)  # (B, S + L, D)
        padded = padded.masked_scatter(keep[..., None], x)  # (B, S + L, D): known positions get their encodings
        x = self.decoder_norm(self._run(self.decoder_blocks, padded + self.decoder_pos_embed_learned))
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned  # (B, L, D)

    def forward_loss(self, z: Tensor, target: Tensor, mask: Tensor, generator: torch.Generator | None = None
                     ) -> Tensor:
        """DiffLoss on `diffusion_batch_mul` copies of every token (own t and ε each), averaged over the masked
        tokens: per-sample (B,), whose batch mean is the official `(loss * mask).sum() / mask.sum()`."""
        bsz, seq_len, _ = target.shape
        mul = self.diffusion_batch_mul
        loss = self.diffloss(target.reshape(bsz * seq_len, -1).repeat(mul, 1),
                             z.reshape(bsz * seq_len, -1).repeat(mul, 1), generator)  # (mul·B·L,)
        weight = mask.reshape(1, bsz, seq_len).float()  # (1, B, L)
        per_sample = (loss.float().reshape(mul, bsz, seq_len) * weight).sum(dim=(0, 2))  # (B,)
        return per_sample * bsz / (weight.sum() * mul).clamp(min=1.0)  # (B,)

    def forward(self, tokens: Tensor, labels: Tensor, mask: Tensor, generator: torch.Generator | None = None
                ) -> Tensor:
        """Training: tokens (B, L, D_tok), labels (B,) (null = num_classes), mask (B, L) -> per-sample loss (B,)."""
        z = self.forward_mae_decoder(self.forward_mae_encoder(tokens, mask, labels), mask)  # (B, L, D_dec)
        return self.forward_loss(z, tokens.detach(), mask, generator)


# Released checkpoints (LTH14/mar: checkpoint-last.pth) hold {"model", "model_ema", ...} under the net's own names.
register_official(MAR, OfficialFormat(ema_entries=("model_ema",), raw_entries=("model",)))
