"""Small ImageNet-like sources for the data tests: synset folders of JPEGs of varied sizes, with the oddities
real ImageNet has (a CMYK JPEG, a greyscale JPEG, a PNG named .JPEG), as a folder, a nested tar, or a flat
val folder with a labels file."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SYNSETS = ["n01440764", "n01443537", "n01484850"]


def _image(rng: np.random.Generator, index: int) -> Image.Image:
    """A smooth random RGB image of 40-72 x 32-64 px (smooth, so JPEG behaves as on photos)."""
    height, width = int(rng.integers(32, 65)), int(rng.integers(40, 73))
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)  # (4, 5, 3)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def _encode(image: Image.Image, kind: str) -> bytes:
    """JPEG bytes of `image` as RGB, CMYK or greyscale JPEG, or PNG bytes (to be saved under a .JPEG name)."""
    buffer = io.BytesIO()
    if kind == "cmyk":
        image.convert("CMYK").save(buffer, format="JPEG", quality=90)
    elif kind == "grey":
        image.convert("L").save(buffer, format="JPEG", quality=90)
    elif kind == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def image_files(per_class: int = 5, seed: int = 0) -> dict[str, bytes]:
    """{'<synset>/<synset>_<i>.JPEG': bytes}; member 1 of class 0 is CMYK, 2 greyscale, 3 a PNG."""
    rng = np.random.default_rng(seed)
    files = {}
    for label, synset in enumerate(SYNSETS):
        for i in range(per_class):
            kind = {(0, 1): "cmyk", (0, 2): "grey", (1, 3): "png"}.get((label, i), "rgb")
            files[f"{synset}/{synset}_{i}.JPEG"] = _encode(_image(rng, i), kind)
    return files


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    """The ImageNet train layout: <root>/<synset>/<file>."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_nested_tar(path: Path, files: dict[str, bytes]) -> Path:
    """ILSVRC2012_img_train.tar's layout: a tar of per-class tars <synset>.tar holding flat files."""
    with tarfile.open(path, "w") as outer:
        for synset in sorted({name.split("/")[0] for name in files}):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for name, data in files.items():
                    if name.startswith(synset + "/"):
                        _add(inner, name.split("/")[1], data)
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    return path


def write_flat_val(root: Path, files: dict[str, bytes]) -> tuple[Path, Path]:
    """ILSVRC2012_img_val's layout: flat ILSVRC2012_val_<i>.JPEG files plus a LOC_val_solution.csv-style file."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["ImageId,PredictionString"]
    for i, (name, data) in enumerate(files.items()):
        stem = f"ILSVRC2012_val_{i + 1:08d}"
        (root / f"{stem}.JPEG").write_bytes(data)
        synset = name.split("/")[0]
        lines.append(f"{stem},{synset} 1 2 30 40 {synset} 3 4 20 20")
    labels = root.parent / "LOC_val_solution.csv"
    labels.write_text("\n".join(lines) + "\n")
    return root, labels


def decoded_rgb(data: bytes) -> np.ndarray:
    """What a reader must see for these bytes: PIL's decode converted to RGB, (H, W, 3) uint8."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))
