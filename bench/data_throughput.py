"""Loader throughput per CPU core: original JPEG shards vs pre-resized shards vs cached latents (issue 13.5).

    python bench/data_throughput.py                      # 512 synthetic ImageNet-like images, tables to stdout
    python bench/data_throughput.py --images 1024 --out bench/data_throughput.md --step-rates

Each format is read by the real train stream (visgen.data.stream.ShardStream / visgen.data.cached.CachedStream) in
this process on one thread: tar reading, decoding, ADM center crop (original JPEGs only), random flip, tensor.
Images are synthetic (no ImageNet here) but shaped like ImageNet train: 333-500 px sides, smooth content plus
sensor-like noise, JPEG quality 90, about 110 KB each (ImageNet-1k train averages ~110 KB; the mean is printed).
The cache holds SD-VAE-shaped moments (8 x 32 x 32 per view, two views) from a stand-in pooling encoder: the
loader's cost depends on the bytes per sample, not on the encoder that wrote them.
`--step-rates` also times DiT-B/2 and SiT-B/2 train steps on this CPU (fp32, 1 thread, ImageNet latent size),
per CPU-second like the loader, so the two columns compare one core's work.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visgen.data.cache import build_cache  # noqa: E402
from visgen.data.cached import CachedStream, read_cache_info  # noqa: E402
from visgen.data.stream import ShardStream  # noqa: E402
from visgen.data.writer import WriteOptions, write_dataset  # noqa: E402

IMAGE_SIZE = 256
# Published A100 training rates (images/s per GPU), for how many loader workers one GPU needs:
# fast-DiT README (chuanyangjin/fast-DiT, "Improved Training Performance"): DiT-XL/2, global batch 128 on one
# A100, mixed precision + gradient checkpointing: 0.84 steps/s from pre-extracted features, 0.56 steps/s with the
# VAE encoder in the step. SiT-B/2 is scaled from DiT-XL/2 by forward GFLOPs (23.0 vs 118.6: an *estimate*), and
# its VAE-in-the-step rate adds the VAE's per-image time implied by the two fast-DiT rates.
DIT_XL_CACHED = 0.84 * 128  # 107.5 img/s
DIT_XL_VAE = 0.56 * 128  # 71.7 img/s
VAE_ONLY = 1.0 / (1.0 / DIT_XL_VAE - 1.0 / DIT_XL_CACHED)  # 215 img/s: SD-VAE encoding, implied
SIT_B_CACHED = DIT_XL_CACHED * 118.6 / 23.0  # estimate
SIT_B_VAE = 1.0 / (1.0 / SIT_B_CACHED + 1.0 / VAE_ONLY)  # estimate


def synthetic_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
    """An ImageNet-like JPEG: random size, smooth colour field plus edges and noise (natural-image entropy)."""
    width, height = int(rng.choice([500, 500, 500, 375, 333, 450])), int(rng.choice([375, 333, 500, 400, 281]))
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)  # (6, 8, 3)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    base[rng.integers(0, height // 2) : rng.integers(height // 2, height), : rng.integers(1, width)] *= 0.6  # an edge
    noise = rng.normal(0, 26, size=(height, width, 3)).astype(np.float32)  # (H, W, 3)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_folder(root: Path, num_images: int, num_classes: int = 10, seed: int = 0) -> tuple[Path, float]:
    """An ImageFolder tree of synthetic JPEGs (synset-like class folders); returns (root, mean KB per file)."""
    rng = np.random.default_rng(seed)
    total_bytes = 0
    for index in range(num_images):
        folder = root / f"n{index % num_classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = synthetic_jpeg(rng)
        (folder / f"img_{index:07d}.JPEG").write_bytes(data)
        total_bytes += len(data)
    return root, total_bytes / num_images / 1e3


class PoolingEncoder(torch.nn.Module):
    """Stand-in KL encoder with SD-VAE's output shape: (B, 3, 256, 256) -> moments (B, 8, 32, 32)."""

    id = "bench-pooling-f8"

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Parameter(torch.randn(8, 3) / 3)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(images, 8)  # (B, 3, 32, 32)
        return torch.einsum("oc,bchw->bohw", self.mix, pooled)  # (B, 8, 32, 32)


def shard_bytes_per_sample(folder: Path, num_samples: int) -> float:
    """Disk bytes per sample of the tar shards in `folder` (tar headers included)."""
    return sum(f.stat().st_size for f in folder.glob("*.tar")) / num_samples


def read_rate(make_stream, num_samples: int, repeats: int = 2) -> float:
    """Best samples per CPU-second over `repeats` full passes of one in-process stream (warm page cache).

    CPU time of this single-threaded process, not wall time: the rate one core gives, even on a shared machine."""
    best = 0.0
    for _ in range(repeats):
        stream = make_stream()
        start = time.process_time()
        count = sum(1 for _ in stream.iter_worker(0, 1))
        elapsed = time.process_time() - start
        assert count == num_samples, (count, num_samples)
        best = max(best, count / elapsed)
    return best


def step_rates() -> dict[str, float]:
    """Train img/s per CPU-second of DiT-B/2 and SiT-B/2 at 32x32x4 latents (fp32, batch 2, 1 thread).

    DiT-XL/2 is not run: its fp32 weights + AdamW states (~11 GB) do not belong on a shared 24 GB machine; the
    table scales DiT-B/2 by forward GFLOPs (118.6 / 23.0) instead, marked as an estimate."""
    sys.path.insert(0, str(ROOT / "bench"))
    from train_step import bench_train, build  # the step train_step.py measures (3 warm-up steps, then timed)

    rates = {}
    for label, net_name, paradigm in (("DiT-B/2", "B/2", "dit"), ("SiT-B/2", "B/2", "sit")):
        torch.manual_seed(0)
        net, shape = build(net_name, 1000)
        cpu_s = []
        for steps in (1, 3):  # CPU time of 3 + steps steps; the difference is 2 warm steps, not wall time
            start = time.process_time()
            bench_train(net, shape, 2, steps, False, torch.device("cpu"), paradigm)
            cpu_s.append(time.process_time() - start)
        rates[label] = 2 * 2 / (cpu_s[1] - cpu_s[0])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) here")
    parser.add_argument("--step-rates", action="store_true", help="also time DiT-XL/2 and SiT-B/2 steps on this CPU")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines: list[str] = []

    with tempfile.TemporaryDirectory(prefix="visgen-bench-data-") as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        folder, mean_kb = write_folder(tmp_path / "folder", args.images)
        print(f"{args.images} synthetic JPEGs, mean {mean_kb:.0f} KB ({time.perf_counter() - start:.0f} s)")

        write_rows = []
        variants = {"original JPEG": WriteOptions(args.per_shard),
                    "256 px PNG": WriteOptions(args.per_shard, resize=IMAGE_SIZE),
                    "256 px JPEG q95": WriteOptions(args.per_shard, resize=IMAGE_SIZE, image_format="jpg")}
        shard_dirs = {}
        for name, options in variants.items():
            out = tmp_path / name.replace(" ", "_")
            start = time.process_time()
            write_dataset(folder, out, options, prefix="train", progress=False)
            rate = args.images / (time.process_time() - start)  # per CPU-second (one process, no workers)
            write_rows.append((name, rate, shard_bytes_per_sample(out, args.images)))
            shard_dirs[name] = out
        num_shards = math.ceil(args.images / args.per_shard)
        spec = {name: str(out / f"train-{{000000..{num_shards - 1:06d}}}.tar") for name, out in shard_dirs.items()}

        caches = {}
        for name, dtype, keep in (("cached f32", "float32", False), ("cached bf16", "bfloat16", False),
                                  ("cached bf16 + image", "bfloat16", True)):
            out = tmp_path / name.replace(" ", "_").replace("+", "img")
            build_cache(PoolingEncoder(), spec["original JPEG"], out, IMAGE_SIZE, dtype=dtype, keep_image=keep,
                        batch_size=32, num_classes=10)
            caches[name] = read_cache_info(out)
            write_rows.append((f"{name} (cache.json)", float("nan"), shard_bytes_per_sample(out, args.images)))

        rates = {}
        for name in shard_dirs:
            rates[name] = read_rate(lambda name=name: ShardStream(spec[name], IMAGE_SIZE, resampled=False,
                                                                  random_flip=True, num_classes=10,
                                                                  resize=name == "original JPEG"), args.images)
        for name, info in caches.items():
            rates[name] = read_rate(lambda info=info, name=name: CachedStream(info, keep_image="image" in name,
                                                                              resampled=False, random_flip=True,
                                                                              num_classes=10), args.images)

    lines += ["| shards | write img/s per core | bytes/sample |", "|---|---:|---:|"]
    lines += [f"| {name} | {'-' if math.isnan(rate) else f'{rate:.0f}'} | {size / 1e3:.1f} KB |"
              for name, rate, size in write_rows]
    base = rates["original JPEG"]
    lines += ["", f"Loader per core ({args.images} samples, decode + crop + flip + tensor, per CPU-second):", "",
              "| format | samples/s/core | x original JPEG | workers per A100: DiT-XL/2 | workers per A100: SiT-B/2 "
              "(estimate) |", "|---|---:|---:|---:|---:|"]
    for name, rate in rates.items():
        cached = name.startswith("cached")
        dit, sit = (DIT_XL_CACHED, SIT_B_CACHED) if cached else (DIT_XL_VAE, SIT_B_VAE)
        lines.append(f"| {name} | {rate:.0f} | {rate / base:.1f} | {math.ceil(dit / rate)} ({dit:.0f} img/s) | "
                     f"{math.ceil(sit / rate)} ({sit:.0f} img/s) |")
    if args.step_rates:
        lines += ["", "Train steps on this CPU (fp32, batch 2, 1 thread, 32x32x4 latents, per CPU-second):", "",
                  "| net | train img/s per core | JPEG loader cores per training core | cached f32 loader cores per "
                  "training core |", "|---|---:|---:|---:|"]
        measured = step_rates()
        measured["DiT-XL/2 (estimate: DiT-B/2 x 23.0 / 118.6 GFLOPs)"] = measured["DiT-B/2"] * 23.0 / 118.6
        for label, rate in measured.items():
            lines.append(f"| {label} | {rate:.3f} | {rate / rates['original JPEG']:.4f} | "
                         f"{rate / rates['cached f32']:.5f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(f"<!-- python bench/data_throughput.py {' '.join(sys.argv[1:])} -->\n{text}\n")


if __name__ == "__main__":
    main()
