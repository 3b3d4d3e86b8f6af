"""REPA's train step: what the frozen encoder's forward costs next to the SiT step, fp32 vs bf16 autocast.

    python bench/repa_step.py                       # REPA-SiT-B/2 on 32x32x4 latents + DINOv2-B/14 on 256 px, batch 8
    python bench/repa_step.py --net XL/2 --batch 32 --encoder l
    python bench/repa_step.py --demo --batch 32     # demo_repa's net and the SimCLR digits encoder
    python bench/repa_step.py --batch 2 --steps 2 --warmup 1 --precision fp32   # on a CPU
    python bench/repa_step.py --flops               # FLOPs per image, B/2, L/2, XL/2 (meta device: no compute)

Rows per precision: SiT's step alone (flow loss, no projector), REPA's full step (encoder forward + flow loss +
projector + alignment loss), REPA's step with the encoder features given (what precomputed features would cost),
and the encoder forward alone. The DINOv2 weights are random (speed does not depend on them), written once to a
temporary file because the encoder only loads from files. Prints a table; no assertions.
`--flops` counts instead (torch.utils.flop_counter on the meta device, any machine, seconds): what the encoder
forward adds to a SiT train step independently of the hardware.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from rich.console import Console
from rich.table import Table
from timing import sync  # bench/timing.py

from visgen.encoders import DINOv2Encoder
from visgen.encoders.dinov2 import DINOV2_SIZES
from visgen.nn.dit import DIT_SIZES
from visgen.nn.repa import REPASiT
from visgen.paradigms.repa import REPA
from visgen.tokenizers.base import PixelTokenizer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def seconds_per_call(fn: Callable[[], object], device: torch.device, steps: int, warmup: int = 2) -> float:
    """Mean wall-clock seconds of fn() over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def build_imagenet(net_name: str, encoder_size: str, tmp: Path) -> tuple[REPASiT, DINOv2Encoder, int, tuple]:
    """REPA-SiT-<net> on 32x32x4 latents and a DINOv2 ViT-<size>/14 with random weights, on 256 px images."""
    size, patch = net_name.split("/")
    weights = tmp / "dinov2.pth"
    model = timm.create_model(f"vit_{DINOV2_SIZES[encoder_size]}_patch14_dinov2", pretrained=False, num_classes=0)
    torch.save(model.state_dict(), weights)
    encoder = DINOv2Encoder(str(weights), size=encoder_size, image_size=256)
    net = REPASiT(**DIT_SIZES[size], patch_size=int(patch), input_size=32, in_channels=4, num_classes=1000,
                  encoder_depth=8, z_dims=[encoder.embed_dim])
    return net, encoder, 256, (4, 32, 32)


def build_demo() -> tuple[REPASiT, object, int, tuple]:
    """Exactly demo_repa's net and encoder (the encoder trains once if it is not cached under .cache/)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo_repa"])
    return (instantiate(cfg.model.net), instantiate(cfg.model.encoders[0]), cfg.data.image_size,
            (3, cfg.data.image_size, cfg.data.image_size))


def repa_step(net: REPASiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    """Forward with the projectors and backward: the net's share of a REPA train step."""
    out, projected = net(x, t, y, project=True)  # (B, C, H, W), K x (B, N, D_k)
    (out.sum() + sum(p.sum() for p in projected)).backward()


def flops_table(encoder_size: str) -> Table:
    """GFLOPs per 256 px image of the train step (forward + backward) and of the encoder forward, per net size."""
    from torch.utils.flop_counter import FlopCounterMode

    def gflops(fn: Callable[[], None]) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    table = Table(title=f"GFLOPs per 256 px image: REPA-SiT-*/2 train step, DINOv2-{encoder_size.upper()}/14 forward "
                        "(torch.utils.flop_counter)")
    for column in ("net", "SiT step", "REPA net step (+ projector)", "encoder forward", "encoder / SiT step",
                   "REPA step / SiT step"):
        table.add_column(column, justify="right")
    with torch.device("meta"):
        encoder = timm.create_model(f"vit_{DINOV2_SIZES[encoder_size]}_patch14_dinov2", pretrained=False,
                                    num_classes=0, img_size=224)
        image = torch.empty(1, 3, 224, 224)
        x, t, y = torch.empty(1, 4, 32, 32), torch.empty(1), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        encode = gflops(lambda: encoder.forward_features(image))
    for size in ("B", "L", "XL"):
        with torch.device("meta"):
            net = REPASiT(**DIT_SIZES[size], patch_size=2, input_size=32, in_channels=4, num_classes=1000,
                          encoder_depth=8, z_dims=[encoder.embed_dim])
        sit = gflops(lambda net=net: net(x, t, y).sum().backward())
        repa = gflops(lambda net=net: repa_step(net, x, t, y))
        table.add_row(f"{size}/2", f"{sit:.1f}", f"{repa:.1f}", f"{encode:.1f}", f"{encode / sit:.0%}",
                      f"{(repa + encode) / sit:.2f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", default="B/2", help="S/2 | B/2 | L/2 | XL/2")
    parser.add_argument("--encoder", default="b", choices=sorted(DINOV2_SIZES), help="DINOv2 size")
    parser.add_argument("--demo", action="store_true", help="demo_repa's net and digits encoder instead")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    parser.add_argument("--flops", action="store_true", help="count FLOPs per image on the meta device instead")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="rows to measure (CPUs without bf16 units emulate it: fp32 only there)")
    args = parser.parse_args()
    if args.flops:
        Console().print(flops_table(args.encoder))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    with tempfile.TemporaryDirectory() as tmp:
        net, encoder, image_size, latent_shape = build_demo() if args.demo else build_imagenet(
            args.net, args.encoder, Path(tmp))
    torch.manual_seed(0)
    module = REPA(net=net, tokenizer=PixelTokenizer(), sampler=None, optimizer={"lr": 1e-4}, image_size=image_size,
                  batch_global=args.batch, encoders=[encoder]).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    batch = {"images": torch.rand(args.batch, 3, image_size, image_size, device=device) * 2 - 1,
             "latents": torch.randn(args.batch, *latent_shape, device=device),
             "labels": torch.randint(0, net.num_classes, (args.batch,), device=device)}

    def train_step(loss_fn: Callable[[], torch.Tensor], autocast) -> Callable[[], None]:
        def step() -> None:
            with autocast:
                loss = loss_fn().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    name = "demo_repa" if args.demo else f"REPA-SiT-{args.net} + DINOv2-{args.encoder.upper()}/14"
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    table = Table(title=f"{name}, batch {args.batch}, {device_name}")
    for column in ("precision", "SiT step (s)", "REPA step (s)", "REPA step, features given (s)",
                   "encoder forward (s)", "encoder / SiT step"):
        table.add_column(column, justify="right")
    for bf16 in [p == "bf16" for p in args.precision]:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        sit = seconds_per_call(train_step(lambda: module.interpolant.training_loss(net, batch["latents"],
                                                                                  batch["labels"]), autocast),
                               device, args.steps, args.warmup)
        repa = seconds_per_call(train_step(lambda: module.loss(net, batch), autocast), device, args.steps, args.warmup)
        with torch.no_grad(), autocast:
            features = module.encoder_features(batch["images"])
            encode = seconds_per_call(lambda: module.encoder_features(batch["images"]), device, args.steps, args.warmup)
        module.encoder_features = lambda images, given=features: given  # precomputed: no encoder forward
        given = seconds_per_call(train_step(lambda: module.loss(net, batch), autocast), device, args.steps, args.warmup)
        del module.encoder_features
        table.add_row("bf16-mixed" if bf16 else "fp32", f"{sit:.3f}", f"{repa:.3f}", f"{given:.3f}", f"{encode:.3f}",
                      f"{encode / sit:.0%}")
    Console().print(table)


if __name__ == "__main__":
    main()
