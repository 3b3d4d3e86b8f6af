"""Reference files: computed from shards with visgen's stream, ADM's format accepted, bad files refused clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from visgen.data.shards import write_shards
from visgen.data.stream import load_all
from visgen.eval.inception import InceptionFeatures
from visgen.eval.metrics import feature_statistics
from visgen.eval.reference import compute_reference, iter_npz_rows, load_reference, reference_features
from visgen.eval.sample_job import write_npz


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> str:
    """5 random 16 x 16 images in 2 shards."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"s{i:03d}", "png": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "cls": i % 3}
               for i in range(5)]
    write_shards(samples, str(root / "ref-%02d.tar"), samples_per_shard=3)
    return str(root / "ref-{00..01}.tar")


def test_reference_from_shards_holds_the_statistics_of_every_image(tiny_shards, inception_weights, tmp_path) -> None:
    out = compute_reference(tiny_shards, 16, tmp_path / "ref.npz", inception_weights, keep_images=4, batch_size=3,
                            num_workers=0, inception_sha256=None)
    images, labels = load_all(tiny_shards, 16)  # (5, 3, 16, 16): the same stream, in order
    feats = InceptionFeatures(inception_weights, expected_sha256=None)(images)
    reference = load_reference(out, ["fid", "sfid", "precision_recall"])
    for metric, name in (("fid", "pool"), ("sfid", "spatial")):
        expected = feature_statistics(feats[name])
        np.testing.assert_allclose(reference.stats[metric].mu, expected.mu, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(reference.stats[metric].sigma, expected.sigma, rtol=1e-5, atol=1e-5)
    with np.load(out) as data:
        assert np.array_equal(data["arr_0"], images[:4].permute(0, 2, 3, 1).numpy())
        assert data["arr_1"].tolist() == labels[:4].tolist()
    assert reference.num_images == 4 and reference.meta["num_images"] == 5
    assert "inception-v3-compat" in reference.meta["extractors"]["inception"]
    # precision/recall features of arr_0 (a stand-in extractor here), computed once, then read from the cache
    class StandIn:
        sha256, calls = "0" * 64, 0

        def __call__(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
            StandIn.calls += 1
            return {"pool": rows.float().mean((2, 3))}  # (n, 3)

    for _ in range(2):
        cached = reference_features(reference, StandIn(), tmp_path / "cache", batch_size=3)
        assert torch.equal(cached, images[:4].float().mean((2, 3)))
    assert StandIn.calls == 2  # 4 rows in batches of 3, the second time from the cache
    assert len(list((tmp_path / "cache" / "reference_features").glob("*.npy"))) == 1
    with pytest.raises(FileExistsError, match="--overwrite"):
        compute_reference(tiny_shards, 16, out, inception_weights, inception_sha256=None)


def _adm_like(path: Path, **override: np.ndarray) -> Path:
    """A file with the ADM reference batch's keys (small random stand-ins)."""
    rng = np.random.default_rng(0)
    arrays = {"mu": rng.normal(size=2048), "sigma": np.eye(2048), "mu_s": rng.normal(size=2023),
              "sigma_s": np.eye(2023), "arr_0": rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)}
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_an_adm_reference_batch_loads(tmp_path) -> None:
    reference = load_reference(_adm_like(tmp_path / "adm.npz"), ["fid", "sfid", "precision_recall"])
    assert set(reference.stats) == {"fid", "sfid"} and reference.num_images == 5
    assert reference.image_shape == (8, 8, 3) and len(reference.sha256) == 64


@pytest.mark.parametrize(("override", "metrics", "match"), [
    ({"mu": None}, ["fid"], "no 'mu'/'sigma'"),
    ({"mu": np.zeros(1000)}, ["fid"], r"'mu' is float64 \(1000,\).*needs float \(2048,\)"),
    ({"sigma": np.eye(2048, dtype=np.int64)}, ["fid"], "'sigma' int64"),
    ({"mu_s": None}, ["fid", "sfid"], "no 'mu_s'/'sigma_s'"),
    ({"arr_0": np.zeros((5, 8, 8, 3), np.float32)}, ["precision_recall"], "arr_0 is float32"),
    ({"arr_0": None}, ["precision_recall"], "0 images in arr_0"),
    ({}, ["fd_dinov2"], "no 'mu_dinov2'.*--dinov2-weights"),
])
def test_bad_references_are_refused_with_the_key_and_the_fix(tmp_path, override, metrics, match) -> None:
    with pytest.raises(ValueError, match=match):
        load_reference(_adm_like(tmp_path / "bad.npz", **override), metrics)


def test_a_file_that_is_not_an_npz_is_refused(tmp_path) -> None:
    (tmp_path / "ref.npz").write_text("mu: 1")
    with pytest.raises(ValueError, match="not an .npz file"):
        load_reference(tmp_path / "ref.npz", ["fid"])
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
        load_reference(tmp_path / "absent.npz", ["fid"])


def test_npz_rows_stream_in_batches(tmp_path) -> None:
    images = np.arange(7 * 2 * 2 * 3, dtype=np.uint8).reshape(7, 2, 2, 3)
    write_npz(tmp_path / "a.npz", {"arr_0": (images.shape, np.uint8, [images])})
    np.savez(tmp_path / "b.npz", arr_0=images)
    for name in ("a.npz", "b.npz"):
        batches = list(iter_npz_rows(tmp_path / name, "arr_0", 3))
        assert [len(b) for b in batches] == [3, 3, 1] and np.array_equal(np.concatenate(batches), images)
