"""A small digit classifier whose logits and features score class-conditional digit generators."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

NUM_CLASSES = 10
FEATURE_DIM = 64
IMAGE_SIZE = 32
MIN_VAL_ACCURACY = 0.97
# Bump when the architecture or training recipe changes so stale caches are retrained, not reused.
RECIPE_VERSION = 1


def check_digit_images(images: Tensor, where: str) -> None:
    """Fail clearly unless `images` is a uint8 (N, 3, 32, 32) batch: the only input the classifier knows."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor of images, got {type(images).__name__}.")
    if images.dtype != torch.uint8:
        raise ValueError(
            f"{where}: images have dtype {images.dtype}; expected torch.uint8 in 0..255. "
            "Convert with (x.clamp(0, 1) * 255).round().to(torch.uint8) before evaluation."
        )
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{where}: images have shape {tuple(images.shape)}; expected (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) "
            "RGB digits (pad 28x28 MNIST by 2 px and repeat the grey channel)."
        )


class DigitClassifier(nn.Module):
    """Three strided conv blocks and a 64-d penultimate layer; trains on 2 CPU cores in ~10-20 s."""

    num_features: int = FEATURE_DIM

    def __init__(self) -> None:
        super().__init__()
        # Strided convs instead of max-pooling: max_pool2d dominated CPU step time and cost accuracy nothing.
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 5, stride=2, padding=2),  # (N, 32, 16, 16)
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),  # (N, 64, 8, 8)
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),  # (N, 64, 4, 4)
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Flatten(),  # (N, 1024)
            nn.Dropout(0.25),
            nn.Linear(64 * 4 * 4, FEATURE_DIM),  # (N, 64)
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(FEATURE_DIM, NUM_CLASSES))

    @staticmethod
    def _to_float(images_uint8: Tensor) -> Tensor:
        """Scale uint8 pixels to [-1, 1] so callers never have to know the training normalisation."""
        check_digit_images(images_uint8, "DigitClassifier")
        return images_uint8.float().div(127.5).sub(1.0)  # (N, 3, 32, 32)

    def features(self, images_uint8: Tensor) -> Tensor:
        """Return the 64-d penultimate activations used as the Fréchet-distance feature space."""
        return self.trunk(self._to_float(images_uint8))  # (N, 64)

    def features_and_logits(self, images_uint8: Tensor) -> tuple[Tensor, Tensor]:
        """Return features and logits from a single pass so metrics need not run the network twice."""
        feats = self.features(images_uint8)  # (N, 64)
        return feats, self.head(feats)  # (N, 64), (N, 10)

    def forward(self, images_uint8: Tensor) -> Tensor:
        """Return class logits for uint8 RGB digits."""
        return self.head(self.features(images_uint8))  # (N, 10)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run the block with one intra-op CPU thread, restoring the caller's setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by an independent integer offset in [-max_shift, max_shift] (zero fill)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # (N, 3, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)  # (N,)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)  # (N,)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :]  # (N, 1, W)
    batch = torch.arange(n)[:, None, None]  # (N, 1, 1)
    shifted = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (N, H, W, 3)
    return shifted.permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


@torch.no_grad()
def evaluate_accuracy(model: DigitClassifier, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Return the fraction of `images` whose argmax prediction equals `labels`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].to(device))  # (B, 10)
        correct += int((logits.argmax(1).cpu() == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(images), 1)


def train_digit_classifier(
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    seed: int = 0,
    epochs: int = 12,
    batch_size: int = 128,
) -> tuple[DigitClassifier, float]:
    """Train a DigitClassifier with ±2 px shift augmentation; return it (eval mode) and its val accuracy."""
    check_digit_images(train_images, "train_digit_classifier(train_images)")
    check_digit_images(val_images, "train_digit_classifier(val_images)")
    for name, imgs, labels in (("train", train_images, train_labels), ("val", val_images, val_labels)):
        if labels.shape != (len(imgs),):
            raise ValueError(
                f"train_digit_classifier: {name}_labels has shape {tuple(labels.shape)} but "
                f"{name}_images has {len(imgs)} images; pass one int label per image."
            )
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train_images) // batch_size)
    # Init and dropout draw from the global RNG: fork and seed it so a seed is reproducible and the caller's
    # RNG state is left untouched. One intra-op thread: this net is too small to gain from two, and OpenMP
    # threads spinning at barriers made training 10-15x slower whenever another process shared the cores.
    # Gradients on even when called from inside Lightning's validation (inference mode): a tokenizer's first
    # validation trains this classifier there, and backward() then failed ("does not require grad").
    with torch.random.fork_rng(devices=[]), _single_thread(), torch.inference_mode(False), torch.enable_grad():
        train_images, train_labels = train_images.clone(), train_labels.clone().long()  # inference -> normal tensors
        torch.manual_seed(seed)
        model = DigitClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(train_images), generator=generator)  # (N,)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]  # (B,)
                batch = _random_shift(train_images[idx], 2, generator)  # (B, 3, 32, 32)
                loss = F.cross_entropy(model(batch), train_labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    model.eval()
    return model, evaluate_accuracy(model, val_images, val_labels.long())


def dataset_key(train_shards: str, val_shards: str) -> str:
    """Hash shard names, sizes and bytes (plus the recipe version) so a different dataset retrains."""
    from visgen.data.stream import expand_shard_spec  # checks that every local shard exists, with a fix hint

    digest = hashlib.sha256(f"recipe={RECIPE_VERSION}".encode())
    for split, spec in (("train", train_shards), ("val", val_shards)):
        for url in expand_shard_spec(spec):
            path = Path(url.removeprefix("file:"))
            if not path.is_file():  # remote shard (pipe:, s3:, http:): only its URL can key the cache
                digest.update(f"{split}:{url}".encode())
                continue
            digest.update(f"{split}:{path.name}:{path.stat().st_size}".encode())
            with path.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write via `write(tmp_path)` then os.replace, so readers never see a half-written cache file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; a shared cache must be readable by others
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_digits(shards: str) -> tuple[Tensor, Tensor]:
    """Load every image and label of a shard pattern (imported lazily: data code is only needed to train)."""
    from visgen.data.stream import load_all

    return load_all(shards, IMAGE_SIZE)


def load_or_train_digit_classifier(
    train_shards: str,
    val_shards: str,
    cache_dir: Path,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> DigitClassifier:
    """Return the cached classifier for these shards, training and caching it (atomically) on first use."""
    cache_dir = Path(cache_dir)
    key = dataset_key(train_shards, val_shards)
    weights_path = cache_dir / f"digit_classifier-{key}.safetensors"
    meta_path = cache_dir / f"digit_classifier-{key}.json"
    if weights_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        _require_accuracy(meta["val_accuracy"], f"cached metadata {meta_path}")
        model = DigitClassifier()
        model.load_state_dict(load_file(str(weights_path)))
        return model.to(device).eval()

    train_images, train_labels = _load_digits(train_shards)
    val_images, val_labels = _load_digits(val_shards)
    started = time.perf_counter()
    model, val_accuracy = train_digit_classifier(
        train_images, train_labels, val_images, val_labels, seed=seed
    )
    seconds = time.perf_counter() - started
    _require_accuracy(val_accuracy, f"training on {train_shards!r} (validated on {val_shards!r})")

    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(weights_path, lambda tmp: save_file(state, str(tmp)))
    meta = {
        "val_accuracy": val_accuracy,
        "dataset_key": key,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "train_seconds": round(seconds, 2),
        "num_train": len(train_images),
        "num_val": len(val_images),
    }
    # Weights first, metadata last: the json's presence marks a complete cache entry.
    _atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return model.to(device).eval()


def _require_accuracy(val_accuracy: float, where: str) -> None:
    """Refuse a classifier below MIN_VAL_ACCURACY: its metrics would not be trustworthy."""
    if val_accuracy < MIN_VAL_ACCURACY:
        raise RuntimeError(
            f"Digit classifier from {where} reaches val accuracy {val_accuracy:.4f} < {MIN_VAL_ACCURACY}; "
            "its accuracy/FID numbers would be unreliable. Check that the shards hold the built-in digits "
            "(32x32 RGB uint8, labels 0-9) or retrain with another seed / more epochs."
        )
