"""The trainable autoencoders behind visgen's VQ and KL tokenizers, in diffusers' layouts.

`VQAutoencoder` is diffusers' `VQModel` (encoder, quant_conv, quantize, post_quant_conv, decoder,
with the same state-dict names) whose quantiser is visgen's `VectorQuantizer`: one lookup for the
whole project, l2-normalised (LlamaGen) or Euclidean (taming), and codes decoded exactly (diffusers'
`VQModel.decode` re-quantises its input unless told not to; here `decode_codes` looks the codes up
and never re-quantises). `KLAutoencoder` is diffusers' `AutoencoderKL` (the layout of SD-VAE and
MAR's KL-16) with the posterior draw and KL term a training loop needs.

Both take diffusers' submodules rather than re-implementing the blocks, so weights trained here,
official taming/LDM files converted with `visgen.tokenizers.ldm_keys`, and diffusers checkpoints are
interchangeable. Parameter counts equal the official models' (tested against the manifests):
LlamaGen VQ-16 71,883,403, VQ-8 70,109,835, MaskGIT's VQGAN 72,141,699, MAR's KL-16 66,456,019.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from visgen.nn.quantize import Quantized, VectorQuantizer

__all__ = ["VQAutoencoder", "KLAutoencoder", "kl_divergence"]


def _diffusers_kwargs(block_out_channels: Sequence[int], down_block_types: Sequence[str] | None,
                      up_block_types: Sequence[str] | None, layers_per_block: int, norm_num_groups: int,
                      mid_block_add_attention: bool, in_channels: int, out_channels: int,
                      act_fn: str) -> dict[str, Any]:
    """The constructor arguments VQModel and AutoencoderKL share; block types default to plain blocks."""
    levels = len(block_out_channels)
    down = list(down_block_types) if down_block_types is not None else ["DownEncoderBlock2D"] * levels
    up = list(up_block_types) if up_block_types is not None else ["UpDecoderBlock2D"] * levels
    if len(down) != levels or len(up) != levels:
        raise ValueError(f"block_out_channels has {levels} levels but down_block_types {len(down)} and "
                         f"up_block_types {len(up)}: give one block type per level")
    return dict(in_channels=in_channels, out_channels=out_channels, down_block_types=tuple(down),
                up_block_types=tuple(up), block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block, act_fn=act_fn, norm_num_groups=norm_num_groups,
                mid_block_add_attention=mid_block_add_attention)


class _DiffusersLayout(nn.Module):
    """Holds a diffusers autoencoder's encoder, 1x1 convs and decoder under diffusers' names."""

    def _adopt(self, reference: nn.Module, levels: int, quantize: nn.Module | None = None) -> None:
        """Take `reference`'s submodules (in diffusers' key order), so names and initialisation are diffusers'."""
        self.encoder = reference.encoder
        self.quant_conv = reference.quant_conv
        if quantize is not None:
            self.quantize = quantize
        self.post_quant_conv = reference.post_quant_conv
        self.decoder = reference.decoder
        self.downsample_factor = 2 ** (levels - 1)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output conv weight: where VQGAN's adaptive weight compares gradient norms."""
        return self.decoder.conv_out.weight


class VQAutoencoder(_DiffusersLayout):
    """diffusers `VQModel` layout with visgen's `VectorQuantizer`: images <-> codes (B, H/f, W/f)."""

    def __init__(
        self,
        block_out_channels: Sequence[int] = (128, 128, 256, 256, 512),
        down_block_types: Sequence[str] | None = None,
        up_block_types: Sequence[str] | None = None,
        layers_per_block: int = 2,
        latent_channels: int = 256,
        num_codes: int = 16384,
        code_dim: int | None = None,
        l2_normalized: bool = False,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        in_channels: int = 3,
        out_channels: int = 3,
        act_fn: str = "silu",
    ):
        """Arguments as diffusers' VQModel (`num_vq_embeddings` -> num_codes, `vq_embed_dim` -> code_dim,
        None: latent_channels) plus the quantiser's (`l2_normalized`, `beta`, `entropy_weight`)."""
        super().__init__()
        from diffusers import VQModel  # seconds to import: only when a VQ is built

        code_dim = code_dim or latent_channels
        kwargs = _diffusers_kwargs(block_out_channels, down_block_types, up_block_types, layers_per_block,
                                   norm_num_groups, mid_block_add_attention, in_channels, out_channels, act_fn)
        #: The constructor arguments (plain values): exported beside the weights so a file rebuilds its net.
        self.config = dict(kwargs, latent_channels=latent_channels, num_codes=num_codes, code_dim=code_dim,
                           l2_normalized=l2_normalized, beta=beta, entropy_weight=entropy_weight,
                           entropy_temperature=entropy_temperature)
        # Build diffusers' model with a 1-code quantiser (not used) and keep its encoder, decoder and 1x1
        # convs: the blocks, their names and their initialisation are exactly diffusers'.
        reference = VQModel(**kwargs, latent_channels=latent_channels, num_vq_embeddings=1, vq_embed_dim=code_dim)
        quantize = VectorQuantizer(num_codes, code_dim, l2_normalized, beta, entropy_weight, entropy_temperature)
        self._adopt(reference, len(block_out_channels), quantize)
        self.num_codes = num_codes

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> pre-quantisation vectors z (B, D, H/f, W/f)."""
        return self.quant_conv(self.encoder(images))

    def decode(self, vectors: Tensor) -> Tensor:
        """Quantised vectors (B, D, h, w) -> images (B, 3, h·f, w·f) (unclamped)."""
        vectors = vectors.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(vectors))

    def encode_codes(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> int64 codes (B, H/f, W/f)."""
        return self.quantize(self.encode(images)).codes

    def decode_codes(self, codes: Tensor) -> Tensor:
        """int64 codes (B, h, w) -> images: the codebook vectors, never re-quantised."""
        return self.decode(self.quantize.lookup(codes))

    def forward(self, images: Tensor) -> tuple[Tensor, Quantized]:
        """Reconstruct: images -> (reconstruction (B, 3, H, W), `Quantized` with codes and VQ losses)."""
        quantized = self.quantize(self.encode(images))
        return self.decode(quantized.vectors), quantized


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over latent dims (LDM's
    DiagonalGaussianDistribution.kl): (B, C, h, w) -> (B,)."""
    return 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum(dim=(1, 2, 3))


class KLAutoencoder(_DiffusersLayout):
    """diffusers `AutoencoderKL` layout: images <-> a diagonal Gaussian posterior (B, C, H/f, W/f)."""

    def __init__(
        self,
        block_out_channels: Sequence[int] = (128, 128, 256, 256, 512),
        down_block_types: Sequence[str] | None = None,
        up_block_types: Sequence[str] | None = None,
        layers_per_block: int = 2,
        latent_channels: int = 16,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        in_channels: int = 3,
        out_channels: int = 3,
        act_fn: str = "silu",
    ):
        """Arguments as diffusers' AutoencoderKL."""
        super().__init__()
        from diffusers import AutoencoderKL

        kwargs = _diffusers_kwargs(block_out_channels, down_block_types, up_block_types, layers_per_block,
                                   norm_num_groups, mid_block_add_attention, in_channels, out_channels, act_fn)
        #: The constructor arguments (plain values), also AutoencoderKL's: see `to_diffusers`.
        self.config = dict(kwargs, latent_channels=latent_channels, use_quant_conv=use_quant_conv,
                           use_post_quant_conv=use_post_quant_conv)
        self._adopt(AutoencoderKL(**self.config), len(block_out_channels))
        self.latent_channels = latent_channels

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> posterior moments (B, 2C, h, w): mean and log-variance concatenated (SDVAETokenizer's
        `encode` format)."""
        moments = self.encoder(images)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode(self, latents: Tensor) -> Tensor:
        """Raw latents (B, C, h, w) -> images (B, 3, H, W) (unclamped)."""
        latents = latents.to(self.decoder.conv_in.weight.dtype)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def forward(self, images: Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """images -> (reconstruction, mean, logvar); the decoder reads a posterior draw (or the mean)."""
        mean, logvar = self.encode(images).float().chunk(2, dim=1)  # (B, C, h, w) each
        logvar = logvar.clamp(-30.0, 20.0)  # diffusers' / LDM's DiagonalGaussianDistribution clamp
        latents = mean
        if sample_posterior:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latents = mean + torch.exp(0.5 * logvar) * eps  # (B, C, h, w)
        return self.decode(latents), mean, logvar

    def to_diffusers(self) -> Any:
        """A diffusers `AutoencoderKL` holding these weights (what `SDVAETokenizer` loads; `save_pretrained` it)."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**self.config)
        vae.load_state_dict(self.state_dict(), strict=True)
        return vae
