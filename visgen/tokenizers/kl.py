"""The KL autoencoder of Stable Diffusion (SD-VAE, Rombach et al., 2022) as a tokenizer, via diffusers.

DiT, SiT and REPA train on its latents: a 256×256 image becomes a (4, 32, 32) posterior
N(mean, exp(logvar)). `encode` returns the posterior moments, concatenated mean and log-variance
(what a latent cache stores, so every epoch can draw a fresh posterior sample); `sample` draws
z = mean + std·ε and normalises it as (z − shift)·scale (SD-VAE: scale 0.18215, shift 0, so the
latents have roughly unit variance); `decode` inverts the normalisation and runs the decoder.

The VAE is frozen and loaded from `pretrained` (a local directory or a hub name). Its weights are
kept out of `state_dict()`: see `SDVAETokenizer.__init__`.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from visgen.tokenizers.base import Tokenizer

if TYPE_CHECKING:  # importing diffusers costs seconds: only when an SD-VAE is actually built
    from diffusers import AutoencoderKL

__all__ = ["KLTokenizer", "SDVAETokenizer", "DEFAULT_VAE"]

#: The VAE DiT/SiT/REPA use; the hub name suggested in the download hint.
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
_TRUE = {"1", "true", "yes", "on"}


def _hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (env) or was at huggingface_hub's import (its constant)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub name 'org/model' (absolute, ./ ~/ relative, or several slashes)."""
    return name.startswith(("/", ".", "~")) or os.path.isabs(name) or name.count("/") > 1 or "\\" in name


def _not_found(pretrained: str, subfolder: str | None, reason: str) -> FileNotFoundError:
    """The error for weights that cannot be loaded, naming what was looked for and the fix."""
    hub = DEFAULT_VAE if _looks_like_path(pretrained) else pretrained
    where = repr(pretrained) + (f" (subfolder {subfolder!r})" if subfolder else "")
    sub = f" --include '{subfolder}/*'" if subfolder else ""
    return FileNotFoundError(
        f"cannot load the SD-VAE {where}: {reason.rstrip('.')}. Nothing is downloaded when offline "
        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Fix: download it on a machine with internet "
        f"with `huggingface-cli download {hub}{sub} --local-dir <dir>` (huggingface_hub >= 1.0: "
        f"`hf download {hub}{sub} --local-dir <dir>`), copy <dir> here and set model.tokenizer.pretrained=<dir>."
    )


def load_autoencoder_kl(pretrained: str, subfolder: str | None = None, local_files_only: bool | None = None,
                        dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """`AutoencoderKL.from_pretrained` that never downloads when offline and fails with the fix in the message."""
    from diffusers import AutoencoderKL

    local = Path(pretrained).expanduser()
    if local.is_dir():
        source, local_files_only = str(local), True
    elif _looks_like_path(pretrained):
        raise _not_found(pretrained, subfolder, f"no local directory {str(local)!r}")
    else:  # a hub name: served from the local HF cache when offline, downloaded only when allowed
        source = pretrained
        if local_files_only is None:
            local_files_only = _hub_offline()
    try:
        vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, local_files_only=local_files_only,
                                            torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:  # diffusers/huggingface_hub raise OSError subclasses for missing files
        raise _not_found(pretrained, subfolder, f"{type(err).__name__}: {err}".splitlines()[0]) from err
    return vae


class SDVAETokenizer(Tokenizer):
    """A frozen diffusers `AutoencoderKL`: images <-> normalised posterior samples (B, 4, H/8, W/8)."""

    def __init__(
        self,
        pretrained: str = DEFAULT_VAE,
        subfolder: str | None = None,
        scale: float = 0.18215,
        shift: float = 0.0,
        local_files_only: bool | None = None,
        dtype: str = "float32",
        vae: AutoencoderKL | None = None,
    ):
        """Load `pretrained` (local dir or hub name; `vae` skips loading) and freeze it in `dtype`."""
        super().__init__()
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise ValueError(f"model.tokenizer.dtype={dtype!r} is not a torch floating dtype (float32, bfloat16, ...)")
        if vae is None:
            vae = load_autoencoder_kl(pretrained, subfolder, local_files_only, torch_dtype)
        if vae.dtype != torch_dtype:
            vae = vae.to(torch_dtype)
        vae = vae.requires_grad_(False).eval()
        self.pretrained = pretrained
        self.subfolder = subfolder
        self.scale = float(scale)
        self.shift = float(shift)
        # The VAE is deliberately NOT a registered submodule: stored in __dict__, it is invisible to
        # state_dict()/load_state_dict(), parameters() and apply(). A frozen 330 MB VAE copied into
        # every checkpoint (and the EMA/optimizer bookkeeping around it) would be pure waste: it is
        # reloaded from `pretrained`, and `id` (recorded in checkpoints) says which VAE it was.
        # `_apply` and `train` below forward .to()/.float()/.eval() to it so it still follows the
        # LightningModule across devices.
        object.__setattr__(self, "_vae", vae)
        # Downsampling: every down block but the last halves the resolution (SD-VAE: 4 blocks -> 8).
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    @property
    def vae(self) -> AutoencoderKL:
        """The frozen diffusers AutoencoderKL (not a registered submodule; see __init__)."""
        return self._vae

    @property
    def dtype(self) -> torch.dtype:
        """The VAE's dtype (`dtype` at load, or whatever a parent's .to(dtype) made it): inputs are cast to it."""
        return self._vae.dtype

    @property
    def id(self) -> str:
        """'<weights name>@<scale>' e.g. 'sd-vae-ft-ema@0.18215'; the name is the basename of `pretrained`."""
        name = Path(self.pretrained.rstrip("/\\")).name or self.pretrained
        if self.subfolder:
            name = f"{name}/{self.subfolder}"
        suffix = f",shift={self.shift!r}" if self.shift else ""
        return f"{name}@{self.scale!r}{suffix}"

    def extra_repr(self) -> str:
        return f"id={self.id!r}, dtype={self.dtype}, downsample={self.downsample}"

    # ----- keep the hidden VAE in step with the module --------------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> SDVAETokenizer:
        """Forward .to(device/dtype), .float(), ... to the unregistered VAE as to a child."""
        if recurse:
            self._vae._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> SDVAETokenizer:
        """The VAE stays in eval mode whatever the parent does."""
        super().train(mode)
        self._vae.eval()
        return self

    def _vae_precision(self, x: Tensor) -> AbstractContextManager[Any]:
        """Run the VAE in its own `dtype` under a trainer's autocast, so latents don't depend on trainer precision."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.autocast(x.device.type, enabled=False)
        return nullcontext()

    # ----- the tokenizer interface -----------------------------------------------------------
    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        """(latent_channels, image_size / f, image_size / f) with f = 2^(down blocks − 1)."""
        if image_size % self.downsample:
            raise ValueError(f"image_size={image_size} is not a multiple of the VAE's downsampling {self.downsample}")
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> float32 moments (B, 2·C, H/f, W/f): mean and log-variance concatenated."""
        # No no_grad here: the VAE's weights are frozen, so autograd records nothing unless the
        # caller asks for gradients w.r.t. the images.
        with self._vae_precision(images):
            moments = self._vae.encode(images.to(self.dtype)).latent_dist.parameters  # (B, 2C, h, w)
        return moments.float()

    def sample(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Moments -> normalised posterior draw (z − shift)·scale, z = mean + std·ε, ε from `generator`."""
        mean, logvar = moments.float().chunk(2, dim=1)  # (B, C, h, w) each
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp diffusers' DiagonalGaussianDistribution uses
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)  # (B, C, h, w)
        return (mean + std * eps - self.shift) * self.scale  # (B, C, h, w)

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (B, C, h, w) -> float32 images (B, 3, h·f, w·f) clamped to [-1, 1]."""
        z = latents / self.scale + self.shift  # (B, C, h, w) in the VAE's raw range
        with self._vae_precision(latents):
            images = self._vae.decode(z.to(self.dtype)).sample  # (B, 3, H, W)
        return images.float().clamp(-1, 1)


#: The generic name: any diffusers KL autoencoder (SD-VAE ft-EMA/MSE, SDXL's, ...) loads the same way.
KLTokenizer = SDVAETokenizer
