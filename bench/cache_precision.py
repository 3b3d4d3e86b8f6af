"""What bfloat16 cache storage (cache.dtype=bfloat16, half the disk) costs against float32 (issue 13.4).

    python bench/cache_precision.py                                   # SD-VAE architecture, random weights
    python bench/cache_precision.py --vae /data/vae/sd-vae-ft-ema --images 32   # real weights: + reconstruction

Encodes synthetic ImageNet-like crops (bench/data_throughput.py) with visgen's SDVAETokenizer, stores the moments
the way the cache does (visgen.data.cache._to_bytes) and reads them back the way training does
(visgen.data.cached.decode_views / view_tensor). Reports the storage error of the posterior mean and std, and
the mean's error in units of the posterior std (the noise every training step adds anyway). With real weights
(--vae) it also decodes both means and reports PSNR(float32 decode, bfloat16 decode) next to the VAE's own
reconstruction PSNR; random weights say nothing about reconstructions, so that part needs --vae.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_throughput import synthetic_jpeg  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

from visgen.data.cache import _to_bytes  # noqa: E402
from visgen.data.cached import decode_views, view_tensor  # noqa: E402
from visgen.data.stream import center_crop_arr  # noqa: E402
from visgen.tokenizers import SDVAETokenizer  # noqa: E402


def stored(moments: torch.Tensor, dtype: str) -> torch.Tensor:
    """(B, 2C, h, w) float32 moments -> written and read back as the cache does, as float32."""
    info = SimpleNamespace(kind="moments", storage_dtype=dtype, sample_shape=[1, *moments.shape[1:]],
                           sample_bytes=moments[0].numel() * (2 if dtype == "bfloat16" else 4))
    rows = [view_tensor(decode_views(data, info)[0], info) for data in _to_bytes(moments[:, None], dtype)]
    return torch.stack(rows).float()  # (B, 2C, h, w)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = float(((a - b) / 2).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default=None, help="diffusers AutoencoderKL dir or hub name (default: random SD-VAE)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if args.vae:
        tokenizer = SDVAETokenizer(args.vae)
    else:  # sd-vae-ft-ema's architecture (diffusers config), random weights
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=args.size)
        tokenizer = SDVAETokenizer("random-sd-vae", vae=vae)
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(args.images):
        with Image.open(io.BytesIO(synthetic_jpeg(rng))) as image:
            crops.append(center_crop_arr(image.convert("RGB"), args.size))
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, S, S) in [-1, 1]
    with torch.no_grad():
        moments = tokenizer.encode(images)  # (B, 8, S/8, S/8) float32
    mean32, logvar32 = stored(moments, "float32").chunk(2, dim=1)
    assert torch.equal(mean32, moments.chunk(2, dim=1)[0])  # float32 storage is exact
    mean16, logvar16 = stored(moments, "bfloat16").chunk(2, dim=1)
    std32, std16 = torch.exp(0.5 * logvar32), torch.exp(0.5 * logvar16)
    rel_mean = (mean16 - mean32).abs() / mean32.abs().clamp_min(1e-12)
    rel_std = (std16 - std32).abs() / std32
    in_std = (mean16 - mean32).abs() / std32
    weights = args.vae or "SD-VAE architecture, random weights"
    lines = [f"bfloat16 vs float32 cache storage, {args.images} synthetic {args.size} px crops, {weights}:", "",
             "| quantity | median | max |", "|---|---:|---:|",
             f"| relative error of the posterior mean | {rel_mean.median():.2e} | {rel_mean.max():.2e} |",
             f"| relative error of the posterior std | {rel_std.median():.2e} | {rel_std.max():.2e} |",
             f"| mean error / posterior std | {in_std.median():.2e} | {in_std.max():.2e} |",
             f"| posterior std (float32) | {std32.median():.2e} | {std32.max():.2e} |"]
    if args.vae:
        with torch.no_grad():
            decoded32 = tokenizer.decode((mean32 - tokenizer.shift) * tokenizer.scale)
            decoded16 = tokenizer.decode((mean16 - tokenizer.shift) * tokenizer.scale)
        lines += [f"| PSNR float32 decode vs bfloat16 decode (dB) | {psnr(decoded32, decoded16):.1f} | |",
                  f"| PSNR image vs float32 decode (the VAE's own error, dB) | {psnr(images, decoded32):.1f} | |"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
