"""Cached latents and codes: the cache equals `encode` of the same crops (KL moments, VQ codes, LlamaGen's ten
crops), the cached loader picks views reproducibly with images flipped alongside, make_batch draws the posterior,
mismatched or crafted sidecars are refused, and two ranks cover every sample exactly once."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from tests.data.imagefolder import image_files, write_folder
from visgen.data.cache import build_cache, crops_of
from visgen.data.cached import SIDECAR_NAME, CacheMismatchError, check_tokenizer, decode_views, read_cache_info
from visgen.data.datamodule import CachedDataModule
from visgen.data.shards import IMAGE_EXTENSIONS, iter_tar_samples
from visgen.data.stream import expand_shard_spec
from visgen.data.writer import WriteOptions, write_dataset
from visgen.sampling import from_uint8
from visgen.tokenizers import SDVAETokenizer
from visgen.training.module import GenerativeModule

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """15 images of 3 classes (with CMYK, greyscale and PNG-in-JPEG members) as 3 shards of 5."""
    root = tmp_path_factory.mktemp("cache_src")
    write_dataset(write_folder(root / "folder", image_files(per_class=5)), root / "train",
                  WriteOptions(samples_per_shard=5), progress=False)
    return str(root / "train" / "train-{000000..000002}.tar")


def _vae(seed: int) -> SDVAETokenizer:
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=SIZE)
    return SDVAETokenizer("tiny-vae", vae=vae)


@pytest.fixture(scope="module")
def kl_cache(source: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[SDVAETokenizer, Path]:
    tokenizer, out = _vae(0), tmp_path_factory.mktemp("kl") / "cache"
    assert build_cache(tokenizer, source, out, SIZE, keep_image=True, batch_size=4, num_workers=2) is not None
    return tokenizer, out


def _source_images(spec: str) -> dict[str, Image.Image]:
    images = {}
    for url in expand_shard_spec(spec):
        with open(url, "rb") as stream:
            for raw in iter_tar_samples(stream, url):
                ext = next(e for e in IMAGE_EXTENSIONS if e in raw)
                images[raw["__key__"]] = Image.open(io.BytesIO(raw[ext]))
    return images


def _cached(folder: Path) -> list[dict]:
    info = read_cache_info(folder)
    samples = []
    for url in expand_shard_spec(info.spec):
        with open(url, "rb") as stream:
            samples.extend({**raw, "views": decode_views(raw[info.kind], info)}
                           for raw in iter_tar_samples(stream, url))
    return samples


def test_kl_cache_holds_the_moments_of_the_crop_and_its_mirror(kl_cache, source: str) -> None:
    tokenizer, folder = kl_cache
    info = read_cache_info(folder)
    assert (info.kind, info.count, info.sample_shape, info.crop) == ("moments", 15, (2, 8, 8, 8), "adm_center")
    sources = _source_images(source)
    cached = _cached(folder)
    assert [c["__key__"] for c in cached] == list(sources)  # every sample, in the source's order
    crops = torch.from_numpy(np.stack([crops_of(sources[c["__key__"]], SIZE, "adm_center")[0] for c in cached]))
    assert np.array_equal(crops_of(sources[cached[0]["__key__"]], SIZE, "adm_center")[1], crops[0].numpy()[:, ::-1])
    images = from_uint8(crops.permute(0, 3, 1, 2))  # (15, 3, 16, 16) in [-1, 1]
    with torch.no_grad():
        plain, mirrored = tokenizer.encode(images), tokenizer.encode(images.flip(dims=[3]))  # (15, 8, 8, 8)
    views = torch.from_numpy(np.stack([c["views"] for c in cached]))  # (15, 2, 8, 8, 8)
    torch.testing.assert_close(views[:, 0], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(views[:, 1], mirrored, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(views[:, 0], views[:, 1])
    stored = np.stack([np.array(Image.open(io.BytesIO(c["png"]))) for c in cached])  # kept images, lossless
    assert np.array_equal(stored, crops.numpy())


def _datamodule(folder: Path, **overrides) -> CachedDataModule:
    kwargs = dict(cache_dir=str(folder), image_size=SIZE, num_classes=3, batch_global=5, batch_per_device=5,
                  num_workers=0, shuffle_buffer=4, seed=1, keep_image=True)
    kwargs.update(overrides)
    return CachedDataModule(**kwargs)


def test_cached_loader_picks_views_per_epoch_and_flips_the_image_with_them(kl_cache) -> None:
    tokenizer, folder = kl_cache
    by_image = {c["png"]: c for c in _cached(folder)}
    module = _datamodule(folder)
    assert module.num_train_samples == 15 and module.steps_per_epoch == 3

    def epoch(index: int) -> list[tuple[bytes, int]]:
        module.set_epoch(index)
        picks = []
        for batch in module.train_dataloader():
            for moments, image in zip(batch["moments"], batch["image"], strict=True):
                plain = Image.fromarray(image.permute(1, 2, 0).numpy())
                flipped = plain.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                for view, candidate in ((0, plain), (1, flipped)):
                    buffer = io.BytesIO()
                    candidate.save(buffer, format="PNG")
                    if buffer.getvalue() in by_image:  # the image as stored, or mirrored
                        assert np.array_equal(moments.numpy(), by_image[buffer.getvalue()]["views"][view])
                        picks.append((buffer.getvalue(), view))
        assert len(picks) == 15
        return picks

    first = epoch(0)
    assert {view for _, view in first} == {0, 1}  # both the crop and its mirror are drawn
    assert epoch(0) == first and epoch(1) != first  # reproducible per (seed, epoch), new each epoch

    batch = next(iter(module.train_dataloader()))
    owner = SimpleNamespace(tokenizer=tokenizer)
    made = GenerativeModule.make_batch(owner, batch, torch.Generator().manual_seed(0))
    mean, logvar = batch["moments"].chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(made["latents"], (mean + torch.exp(0.5 * logvar) * eps) * 0.18215)
    assert torch.equal(made["images"], from_uint8(batch["image"])) and torch.equal(made["labels"], batch["label"])

    module = _datamodule(folder, train_stream="exact", num_train_samples=None)  # the count from cache.json
    assert len({image for image, _ in epoch(0)}) == 15  # every cached sample once
    module = _datamodule(folder)
    assert len({image for image, _ in epoch(0)}) < 15  # resampled shards repeat some (the broken variant)


def test_a_cache_of_another_run_is_refused(kl_cache, tmp_path: Path) -> None:
    tokenizer, folder = kl_cache
    with pytest.raises(CacheMismatchError, match=r"holds 16x16 images but data.image_size=32"):
        _datamodule(folder, image_size=32)
    with pytest.raises(CacheMismatchError, match=r"crop 'adm_center' but data.crop='ten_crop'"):
        _datamodule(folder, crop="ten_crop")
    check_tokenizer(read_cache_info(folder), tokenizer)
    with pytest.raises(CacheMismatchError, match=r"tokenizer 'tiny-vae@0.18215' of weights sha256 \w+\.\.\. but this "
                                                  r"run's 'tiny-vae@0.18215' has weights \w+"):
        check_tokenizer(read_cache_info(folder), _vae(1))
    with pytest.raises(CacheMismatchError, match=r"made with tokenizer 'tiny-vae@0.18215' but this run uses 'other"):
        check_tokenizer(read_cache_info(folder), SDVAETokenizer("other", vae=tokenizer.vae))

    # The sidecar is data: a crafted one can neither point outside the folder nor name code to run.
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    sidecar = json.loads((folder / SIDECAR_NAME).read_text())
    sidecar["tokenizer"]["_target_"] = "os.system"
    sidecar["shards"][0]["name"] = "../../../etc/passwd"
    (crafted / SIDECAR_NAME).write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match=r"shard entry 0 must be \{'name': 'cache-000000.tar'"):
        read_cache_info(crafted)


def test_vq_ten_crop_cache_holds_the_codes_of_every_crop(source: str, tmp_path: Path) -> None:
    from tests.tokenizers.test_vq import TINY
    from visgen.tokenizers import VQTokenizer
    from visgen.tokenizers.autoencoders import VQAutoencoder

    torch.manual_seed(0)
    tokenizer = VQTokenizer(autoencoder=VQAutoencoder(**TINY))
    build_cache(tokenizer, source.replace("000002", "000000"), tmp_path / "vq", SIZE, crop="ten_crop", batch_size=3)
    info = read_cache_info(tmp_path / "vq")
    assert (info.kind, info.storage_dtype, info.sample_shape, info.crop_size) == ("codes", "uint16", (10, 8, 8), 17)
    sources = _source_images(source.replace("000002", "000000"))
    for sample in _cached(tmp_path / "vq"):
        views = crops_of(sources[sample["__key__"]], SIZE, "ten_crop", 1.1)  # (10, 16, 16, 3)
        assert np.array_equal(views[5:9], views[:4, :, ::-1])  # view 5 + k mirrors corner k
        with torch.no_grad():
            expected = tokenizer.encode(from_uint8(torch.from_numpy(views).permute(0, 3, 1, 2)))  # (10, 8, 8)
        assert torch.equal(torch.from_numpy(sample["views"].astype(np.int64)), expected)
    batch = next(iter(_datamodule(tmp_path / "vq", crop="ten_crop", keep_image=False, num_classes=3,
                                  batch_global=5, batch_per_device=5).train_dataloader()))
    assert batch["moments"].dtype == torch.int64 and batch["moments"].shape == (5, 8, 8)
    assert torch.equal(GenerativeModule.make_batch(SimpleNamespace(tokenizer=tokenizer), batch)["latents"],
                       batch["moments"])


def test_two_processes_cache_every_sample_exactly_once(source: str, tmp_path: Path) -> None:
    out = tmp_path / "two"
    command = [sys.executable, "-m", "visgen.data.cache", "experiment=demo_sit", f"data.image_size={SIZE}",
               "data.num_classes=3", f"cache.src='{source}'", f"cache.out_dir={out}", "cache.num_workers=0",
               "cache.batch_size=4", "cache.device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen(command, cwd=ROOT, env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    info = read_cache_info(out)
    cached = _cached(out)
    assert [c["__key__"] for c in cached] == list(_source_images(source))  # each sample once, in order
    assert info.count == 15 and info.tokenizer_id == "pixel" and info.sample_shape == (2, 3, SIZE, SIZE)
    progress = {p.name for p in (out / ".progress").iterdir()}
    assert progress == {f"cache-00000{i}.tar.json" for i in range(3)}
    from visgen.tokenizers import PixelTokenizer

    # A rerun finds every shard done and only rewrites the sidecar; other settings are refused.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert build_cache(PixelTokenizer(), source, out, SIZE)["count"] == 15
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    with pytest.raises(FileExistsError, match=r"other settings \(storage_dtype: 'float32' then, 'bfloat16' now\)"):
        build_cache(PixelTokenizer(), source, out, SIZE, dtype="bfloat16")
