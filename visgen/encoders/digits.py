"""A label-free encoder for REPA on the built-in digits: a small CNN trained with SimCLR on the training split.

REPA needs a frozen self-supervised encoder. DINOv2 knows nothing of 32 × 32 digits, and the digit classifier
that scores the demo (`visgen.eval.classifier`) was trained with labels: aligning with it would teach the
generator the evaluator's own features and game `classifier_accuracy`. So the demo aligns with this encoder,
trained on the 4,500 training images without ever reading a label, by SimCLR (Chen et al., 2020): two random
views of each image (affine jitter: rotation, scale, shift; and stroke thickness), a small CNN whose 8 × 8 output
grid is the demo SiT's token grid, the grid's mean through an MLP head, and the NT-Xent loss that pulls the two
views of an image together and pushes the batch's other images away. REPA aligns with the grid's 64 feature
vectors (width 64, receptive field 27 px). A ViT of the same cost did not start learning within 30 steps here
(the NT-Xent loss stayed at log(2B − 1)); the BatchNorm CNN did at once.

The trained encoder is cached under `cache_dir`, keyed by the training shards' bytes and this recipe, so it trains
once (`python -m visgen.encoders.digits` trains it explicitly and prints how long it took).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from visgen.data.cached import file_sha256
from visgen.encoders.base import AlignmentEncoder

__all__ = ["DigitsCNN", "DigitsEncoder", "augment", "load_or_train_digits_encoder", "nt_xent_loss",
           "train_digits_encoder"]

IMAGE_SIZE = 32
# Bump when the architecture or the training recipe changes, so a stale cache is retrained, not reused.
RECIPE_VERSION = 1
RECIPE = {"method": "simclr", "channels": [16, 32, 32, 64, 64], "epochs": 10, "batch": 128, "lr": 2e-3,
          "weight_decay": 0.05, "temperature": 0.2, "proj_dim": 64}


class DigitsCNN(nn.Module):
    """Five 3 × 3 conv-BN-ReLU layers with strides 1, 2, 1, 2, 1: digits (B, 3, 32, 32) -> 8 × 8 grid tokens."""

    def __init__(self, channels: list[int] | tuple[int, ...] = tuple(RECIPE["channels"])) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for i, out_channels in enumerate(channels):
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2 if i in (1, 3) else 1, padding=1),
                       nn.BatchNorm2d(out_channels), nn.ReLU()]
            in_channels = out_channels
        self.trunk = nn.Sequential(*layers)
        self.embed_dim = in_channels

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, 32, 32) in [-1, 1] -> (B, 64, C) grid tokens, row-major like the SiT's patch tokens."""
        return self.trunk(images).flatten(2).transpose(1, 2)  # (B, 64, C)


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """One random view of each digit (B, 3, 32, 32) in [-1, 1]: rotation ±15°, scale 0.8-1.15, shift ±3 px, and
    with probability 1/2 a thicker or thinner stroke (3 × 3 max-pool dilation or erosion)."""
    b = images.shape[0]
    rand = torch.rand(b, 5, generator=generator)  # (B, 5)
    angle = (rand[:, 0] * 2 - 1) * math.radians(15)  # (B,)
    scale = 0.8 + 0.35 * rand[:, 1]  # (B,)
    shift = (rand[:, 2:4] * 2 - 1) * (3 / (IMAGE_SIZE / 2))  # (B, 2) in normalised coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # (B,) each
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, 32, 32, 2)
    view = F.grid_sample(images + 1, grid, align_corners=False, padding_mode="zeros") - 1  # (B, 3, 32, 32)
    dilated = F.max_pool2d(view, 3, stride=1, padding=1)  # (B, 3, 32, 32)
    eroded = -F.max_pool2d(-view, 3, stride=1, padding=1)  # (B, 3, 32, 32)
    choice = rand[:, 4].view(b, 1, 1, 1)  # (B, 1, 1, 1)
    return torch.where(choice < 0.25, dilated, torch.where(choice < 0.5, eroded, view))  # (B, 3, 32, 32)


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent: each view's positive is the other view of its image, the other 2B − 2 are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, P)
    logits = z @ z.T / temperature  # (2B, 2B)
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    b = z1.shape[0]
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)  # (2B,)
    return F.cross_entropy(logits, targets)


def train_digits_encoder(images: Tensor, seed: int = 0) -> tuple[DigitsCNN, dict[str, float]]:
    """Train the CNN with SimCLR on uint8 images (N, 3, 32, 32), no labels; return it in eval mode and stats."""
    from visgen.eval.classifier import _single_thread

    r = RECIPE
    generator = torch.Generator().manual_seed(seed)
    data = images.float() / 127.5 - 1.0  # (N, 3, 32, 32) in [-1, 1]
    steps_per_epoch = len(data) // r["batch"]
    # fp32 on one thread, as the digit classifier: bf16 autocast made this small net ~6x slower on CPU, and
    # spinning OpenMP threads slow it down many times over whenever another process shares the cores.
    with torch.random.fork_rng(devices=[]), _single_thread():
        torch.manual_seed(seed)
        cnn = DigitsCNN(r["channels"])
        head = nn.Sequential(nn.Linear(cnn.embed_dim, 256), nn.ReLU(), nn.Linear(256, r["proj_dim"]))
        params = [*cnn.parameters(), *head.parameters()]
        optimizer = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=r["lr"], pct_start=0.1,
                                                       total_steps=r["epochs"] * steps_per_epoch)
        started, cpu_started, loss = time.perf_counter(), time.process_time(), torch.zeros(())
        for _ in range(r["epochs"]):
            order = torch.randperm(len(data), generator=generator)  # (N,)
            for step in range(steps_per_epoch):
                batch = data[order[step * r["batch"]:(step + 1) * r["batch"]]]  # (B, 3, 32, 32)
                views = torch.cat([augment(batch, generator), augment(batch, generator)])  # (2B, 3, 32, 32)
                z1, z2 = head(cnn(views).mean(dim=1)).chunk(2)  # (B, P) each, from the grid's mean
                loss = nt_xent_loss(z1, z2, r["temperature"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    stats = {"train_seconds": round(time.perf_counter() - started, 1),
             "train_cpu_seconds": round(time.process_time() - cpu_started, 1), "final_loss": round(loss.item(), 4)}
    return cnn.eval(), stats


def load_or_train_digits_encoder(train_shards: str, cache_dir: str | Path, seed: int = 0) -> tuple[DigitsCNN, Path]:
    """The cached SimCLR CNN of these training shards (trained and cached atomically on first use), and its file."""
    from visgen.eval.classifier import _atomic_write, dataset_key

    cache_dir = Path(cache_dir)
    key = dataset_key(train_shards, train_shards)  # the training split only: the encoder never sees val
    stem = f"digits_simclr_cnn-r{RECIPE_VERSION}-s{seed}-{key}"
    weights_path, meta_path = cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"
    cnn = DigitsCNN(RECIPE["channels"])
    if weights_path.is_file() and meta_path.is_file():
        cnn.load_state_dict(load_file(str(weights_path)), strict=True)
        return cnn.eval(), weights_path
    from visgen.data.stream import load_all

    images, _ = load_all(train_shards, IMAGE_SIZE)  # the labels are dropped here, unread
    trained, stats = train_digits_encoder(images, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in trained.state_dict().items()}
    _atomic_write(weights_path, lambda tmp: save_file(state, str(tmp)))
    meta = {"recipe": RECIPE, "recipe_version": RECIPE_VERSION, "seed": seed, "num_train": len(images),
            "labels_used": False, **stats}
    _atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))  # last: marks it complete
    cnn.load_state_dict(state, strict=True)
    return cnn.eval(), weights_path


class DigitsEncoder(AlignmentEncoder):
    """The frozen SimCLR CNN: digits (B, 3, 32, 32) in [-1, 1] -> (B, 64, 64) grid features (8 × 8)."""

    def __init__(self, train_shards: str, cache_dir: str, image_size: int = IMAGE_SIZE, seed: int = 0) -> None:
        """Load the encoder cached for `train_shards` under `cache_dir`, training it first if there is none."""
        if image_size != IMAGE_SIZE:
            raise ValueError(f"the digits encoder reads {IMAGE_SIZE} px digits, got image_size={image_size}")
        cnn, path = load_or_train_digits_encoder(train_shards, cache_dir, seed)
        super().__init__(cnn, cnn.embed_dim, f"digits-simclr-cnn-r{RECIPE_VERSION}", file_sha256(path), image_size)

    @property
    def token_grid(self) -> int:
        """32 px after two stride-2 convolutions: 8."""
        return IMAGE_SIZE // 4

    def preprocess(self, images: Tensor) -> Tensor:
        """The encoder trained on [-1, 1] pixels: nothing to do."""
        return images

    def patch_tokens(self, inputs: Tensor) -> Tensor:
        """The 8 × 8 grid's features, in fp32 under any autocast (bf16 made this small CNN slower on CPU)."""
        with torch.autocast(inputs.device.type, enabled=False):
            return self.frozen_net(inputs.float())  # (B, 64, 64)


def main(argv: list[str] | None = None) -> int:
    """Train (or find) the cached digits encoder and print where it is and how long it trained."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-shards", default="data/digits/digits-train-{000000..000009}.tar")
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _, path = load_or_train_digits_encoder(args.train_shards, args.cache_dir, args.seed)
    meta = json.loads(path.with_suffix(".json").read_text())
    print(f"digits encoder: {path} (SimCLR CNN, {meta['recipe']['epochs']} epochs on {meta['num_train']} unlabelled "
          f"training images: {meta['train_seconds']} s, {meta['train_cpu_seconds']} s of CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
