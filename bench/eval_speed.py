"""Throughput of an FID evaluation: DiT sampling (DDPM + CFG) with SD-VAE decoding, then Inception features.

    python bench/eval_speed.py --net B/2 --steps 250 --batch 2 --inception-weights <weights-inception-...pth>
    python bench/eval_speed.py --net XL/2 --steps 250 --batch 64          # on a GPU: the 50k-sample ETA

Runs one chunk through the real sampling job (`visgen.eval.sample_job`: `generate` with the job's quantisation,
then the feature extractor on the device), with randomly initialised nets: speed does not depend on the weights.
Prints img/s per stage and the time 50,000 samples would take on this device. On a CPU it also prints the
process's CPU seconds per image for each stage (`time.process_time`, all threads): on a shared machine the
wall-clock rate depends on the other jobs, the CPU cost does not. No assertions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from functools import partial

import torch
from rich.console import Console
from rich.table import Table

from visgen.diffusion.gaussian_samplers import DDPMSampler
from visgen.eval.distributed import Ranks
from visgen.eval.sample_job import ChunkPlan, SampleJob, postprocess
from visgen.nn.dit import DIT_SIZES, DiT
from visgen.sampling import generate

# SD-VAE (stabilityai/sd-vae-ft-ema) architecture: diffusers AutoencoderKL defaults with these blocks.
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "block_out_channels": (128, 256, 512, 512), "sample_size": 256,
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="B/2", help="DiT size/patch: S/2, B/2, L/2, XL/2")
    parser.add_argument("--steps", type=int, default=250, help="DDPM steps (DiT: 250)")
    parser.add_argument("--cfg", type=float, default=1.5, help="CFG scale (DiT: 1.5; > 1 doubles the batch)")
    parser.add_argument("--batch", type=int, default=2, help="per-device batch = one chunk")
    parser.add_argument("--fp32", action="store_true", help="sample in fp32 (default: bf16 autocast)")
    parser.add_argument("--inception-weights", default=None, help="Inception weights file (skip features if unset)")
    parser.add_argument("--inception-sha256", default=None, help="expected sha256 (default: accept the file)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    size, patch = args.net.split("/")
    net = DiT(**DIT_SIZES[size], patch_size=int(patch), input_size=32, in_channels=4, num_classes=1000,
              learn_sigma=True).to(device).eval()
    from diffusers import AutoencoderKL

    from visgen.tokenizers.kl import SDVAETokenizer

    tokenizer = SDVAETokenizer(vae=AutoencoderKL(**SD_VAE)).to(device)
    sampler = DDPMSampler(num_steps=args.steps, cfg_scale=args.cfg, guided_channels=3, learn_sigma=True)
    autocast = nullcontext() if args.fp32 else torch.autocast(device.type, dtype=torch.bfloat16)
    to_uint8 = partial(postprocess, quantize_mode="round_half_up")

    decode_seconds, decode_cpu_seconds = [], []

    def decode(latents: torch.Tensor) -> torch.Tensor:  # timed separately: the share of the VAE
        start, cpu_start = time.perf_counter(), time.process_time()
        images = tokenizer.decode(latents)
        if device.type == "cuda":
            torch.cuda.synchronize()
        decode_seconds.append(time.perf_counter() - start)
        decode_cpu_seconds.append(time.process_time() - cpu_start)
        return images

    class TimedTokenizer:
        latent_shape = staticmethod(tokenizer.latent_shape)

    timed = TimedTokenizer()
    timed.decode = decode

    cpu_seconds = {"sampling": 0.0, "features": 0.0}

    def sample_fn(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cpu_start = time.process_time()
        with autocast:
            images = generate(net, timed, sampler, labels, 256, generator, postprocess=to_uint8)
        cpu_seconds["sampling"] += time.process_time() - cpu_start
        return images

    extractors = {}
    if args.inception_weights:
        from visgen.eval.inception import InceptionFeatures

        inception = InceptionFeatures(args.inception_weights, args.inception_sha256).to(device)

        def features(images: torch.Tensor) -> dict[str, torch.Tensor]:
            cpu_start = time.process_time()
            out = inception(images)
            cpu_seconds["features"] += time.process_time() - cpu_start
            return out

        extractors["inception"] = features
    with tempfile.TemporaryDirectory() as out:
        job = SampleJob(out, ChunkPlan(args.batch, args.batch, 0, 1000, "uniform"), {"bench": args.net})
        ranks = Ranks(0, 1, 0, device)
        job.prepare(ranks)
        timings = job.run(ranks, sample_fn, extractors, progress=False)
    n = args.batch
    total = timings["sampling_seconds"] + timings["feature_seconds"]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    table = Table(title=f"DiT-{args.net}, {args.steps}-step DDPM, CFG {args.cfg}, {'fp32' if args.fp32 else 'bf16'}, "
                        f"batch {n}, {device_name}")
    on_cpu = device.type == "cpu"
    for column in ("stage", "seconds", "img/s") + (("CPU s/img",) if on_cpu else ()):
        table.add_column(column, justify="right")
    net_seconds = timings["sampling_seconds"] - decode_seconds[0]
    rows = [("DiT sampling", net_seconds, cpu_seconds["sampling"] - decode_cpu_seconds[0]),
            ("SD-VAE decode", decode_seconds[0], decode_cpu_seconds[0]),
            ("sampling job (net + decode + uint8)", timings["sampling_seconds"], cpu_seconds["sampling"])]
    if extractors:
        rows += [("Inception features", timings["feature_seconds"], cpu_seconds["features"]),
                 ("total", total, cpu_seconds["sampling"] + cpu_seconds["features"])]
    for stage, seconds, cpu in rows:
        table.add_row(stage, f"{seconds:.2f}", f"{n / seconds:.4f}", *((f"{cpu / n:.1f}",) if on_cpu else ()))
    Console().print(table)
    print(f"50,000 samples at this rate: {50_000 * total / n / 3600:.1f} device-hours")


if __name__ == "__main__":
    main()
