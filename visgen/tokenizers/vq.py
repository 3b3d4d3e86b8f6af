"""VQ tokenizers (VQGAN, LlamaGen's VQ-16/VQ-8, visgen-trained VQs) behind README convention 5.

`encode` maps images in [-1, 1] to int64 codes (B, h, w); `sample` is the identity (codes are what a
cache stores and what a generator models); `decode` looks codes up in the codebook and decodes them
exactly, never re-quantising. `latent_shape(image_size)` is (h, w), `vocab_size` the codebook size,
and `id` the tokenizer's name plus a hash of its weights, so codes of one tokenizer are never read
with another.

Weights load strictly from a local path: a file exported by visgen's tokenizer training
(`save_vq_tokenizer`: safetensors with the net's config in its metadata, so the file alone rebuilds
the net), a visgen `.ckpt` of that training (its EMA weights), a diffusers `VQModel` directory, or an
official release whose names a key format converts (`key_format`: "diffusers", "ldm" for taming /
LDM names, or the dotted path of a converter inside `visgen` that another family provides; "auto"
tries them and keeps the one whose result fits the net exactly).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from visgen.tokenizers.autoencoders import VQAutoencoder
from visgen.tokenizers.base import FrozenNetTokenizer
from visgen.tokenizers.ldm_keys import is_ldm_layout, ldm_to_diffusers

log = logging.getLogger(__name__)

__all__ = ["VQTokenizer", "save_vq_tokenizer", "read_tokenizer_file", "convert_keys", "weights_hash",
           "KEY_FORMATS"]

StateDict = dict[str, Tensor]
#: Metadata keys of an exported tokenizer file.
META_KIND, META_CONFIG, META_NAME = "visgen_tokenizer", "config", "name"
#: Names of the key formats `VQTokenizer(key_format=...)` knows; a dotted "visgen.<module>.<fn>" also works.
KEY_FORMATS: dict[str, Callable[[StateDict], StateDict]] = {
    "diffusers": dict,  # visgen's and diffusers' names: nothing to rename
    "ldm": ldm_to_diffusers,  # taming / latent-diffusion / MAR names
}
#: Weight files looked for inside a directory (diffusers' save_pretrained names first).
_DIR_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "tokenizer.safetensors",
              "diffusion_pytorch_model.bin")


def weights_hash(state: Mapping[str, Tensor], length: int = 12) -> str:
    """Hex digest of names, dtypes, shapes and values of a state dict (independent of key order)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:length]


def save_vq_tokenizer(autoencoder: VQAutoencoder, path: str | Path, name: str) -> Path:
    """Export a trained VQ as one safetensors file: weights plus the net's config and `name` as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in autoencoder.state_dict().items()}
    meta = {META_KIND: "vq", META_CONFIG: json.dumps(autoencoder.config), META_NAME: name}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # a kill mid-write leaves the previous export intact
    return path


def _weights_file(path: Path) -> Path:
    """The weights file of `path` (a file, or a diffusers-style directory)."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in _DIR_FILES:
            if (path / name).is_file():
                return path / name
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates[0]
        raise FileNotFoundError(f"tokenizer directory {path} holds none of {list(_DIR_FILES)} (and not exactly one "
                                f"*.safetensors file); set model.tokenizer.pretrained to the weights file itself")
    raise FileNotFoundError(
        f"tokenizer weights {str(path)!r} do not exist. Train one (`python train.py experiment=demo_vq` exports "
        "logs/demo_vq/tokenizer.safetensors) or convert an official release, then set model.tokenizer.pretrained"
    )


def read_tokenizer_file(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """(state dict, metadata) of a tokenizer file: exported safetensors (metadata kept), a visgen `.ckpt`
    (EMA weights), a training-script or Lightning checkpoint ("ema", "model" or "state_dict" entry), a raw
    state dict, or a diffusers directory."""
    from visgen.official import OfficialFormat, official_state_dict, read_checkpoint

    file = _weights_file(Path(path).expanduser())
    meta: dict[str, str] = {}
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
    fmt = OfficialFormat(ema_entries=("ema",), raw_entries=("model", "state_dict"))
    state, _ = official_state_dict(read_checkpoint(file), str(file), fmt)
    return state, meta


def _resolve_converter(key_format: str) -> Callable[[StateDict], StateDict]:
    """A registered format name, or the dotted path of a converter function inside `visgen`."""
    if key_format in KEY_FORMATS:
        return KEY_FORMATS[key_format]
    if key_format.startswith("visgen.") and "." in key_format[len("visgen."):]:
        module, _, attr = key_format.rpartition(".")
        converter = getattr(importlib.import_module(module), attr, None)
        if callable(converter):
            return converter
    raise ValueError(f"model.tokenizer.key_format={key_format!r} is neither 'auto', one of {sorted(KEY_FORMATS)}, "
                     "nor the dotted path of a key-converter function inside visgen")


def convert_keys(state: StateDict, target: Mapping[str, Tensor], key_format: str = "auto") -> tuple[StateDict, str]:
    """Rename `state` into the names of `target` (a net's state dict) with `key_format`; "auto" picks the
    format whose result has exactly the target's keys and shapes. Returns (renamed state, format used)."""
    if key_format != "auto":
        return _resolve_converter(key_format)(state), key_format
    layout = {k: tuple(v.shape) for k, v in target.items()}
    for name in ("ldm", "diffusers") if is_ldm_layout(state) else ("diffusers", "ldm"):
        try:
            converted = KEY_FORMATS[name](state)
        except (KeyError, ValueError):
            continue
        if {k: tuple(v.shape) for k, v in converted.items()} == layout:
            return converted, name
    return state, "diffusers"  # nothing fits: the strict load names the differences


class VQTokenizer(FrozenNetTokenizer):
    """A frozen `VQAutoencoder`: images <-> int64 codes (B, H/f, W/f), decoded exactly."""

    def __init__(
        self,
        pretrained: str | None = None,
        autoencoder: VQAutoencoder | Mapping[str, Any] | None = None,
        name: str | None = None,
        key_format: str = "auto",
        dtype: str = "float32",
    ):
        """Load `pretrained` (file or directory; None: keep `autoencoder`'s random weights, for tests) into
        `autoencoder` (a built net, its config, or None to rebuild it from an exported file's metadata)."""
        super().__init__()
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
            raise ValueError(f"model.tokenizer.dtype={dtype!r} is not a torch floating dtype (float32, bfloat16, ...)")
        state, meta = read_tokenizer_file(pretrained) if pretrained else ({}, {})
        if autoencoder is None:
            if META_CONFIG not in meta:
                raise ValueError(f"model.tokenizer.autoencoder is not set and {pretrained!r} is not a visgen-exported "
                                 "tokenizer (no config in its metadata); give the autoencoder's layout, e.g. "
                                 "model/tokenizer/layout@model.tokenizer.autoencoder=<layout>")
            autoencoder = VQAutoencoder(**json.loads(meta[META_CONFIG]))
        elif isinstance(autoencoder, Mapping):
            autoencoder = VQAutoencoder(**autoencoder)
        if pretrained:
            from visgen.official import LayoutDiff, load_strict

            state, used = convert_keys(state, autoencoder.state_dict(), key_format)
            net_layout = {k: tuple(v.shape) for k, v in autoencoder.state_dict().items()}
            diff = LayoutDiff.between({k: tuple(v.shape) for k, v in state.items()}, net_layout)
            if not diff.ok:  # checked here: load_strict's hint searches generator presets, no help for a tokenizer
                raise ValueError(f"VQ tokenizer weights {pretrained!r} (key format {used!r}) do not fit the "
                                 f"{type(autoencoder).__name__} of model.tokenizer.autoencoder: "
                                 f"{diff.describe(net_layout)}\nCheck the layout (model/tokenizer/layout) and "
                                 "key_format.")
            load_strict(autoencoder, state, f"VQ tokenizer {pretrained} (key format {used!r})")
        else:
            log.warning("VQTokenizer without pretrained weights: its codes come from a randomly initialised net")
        self.pretrained = pretrained
        self.name = name or meta.get(META_NAME) or (Path(pretrained).stem if pretrained else "vq-random")
        self._hash = weights_hash(autoencoder.state_dict())
        self._hold(autoencoder.to(torch_dtype))
        self.vocab_size = autoencoder.num_codes
        self.downsample = autoencoder.downsample_factor

    @property
    def autoencoder(self) -> VQAutoencoder:
        """The frozen VQ network (not a registered submodule: see `FrozenNetTokenizer`)."""
        return self.frozen_net

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the network (its conv weights)."""
        return self.autoencoder.quant_conv.weight.dtype

    @property
    def id(self) -> str:
        """'<name>@<12 hex digits of the weights' sha256>', e.g. 'demo_vq@3f2a...'."""
        return f"{self.name}@{self._hash}"

    def extra_repr(self) -> str:
        return f"id={self.id!r}, vocab_size={self.vocab_size}, downsample={self.downsample}, dtype={self.dtype}"

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        """(h, w) = image_size / f per side."""
        if image_size % self.downsample:
            raise ValueError(f"image_size={image_size} is not a multiple of the VQ tokenizer's downsampling "
                             f"{self.downsample}")
        return (image_size // self.downsample, image_size // self.downsample)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> int64 codes (B, H/f, W/f)."""
        with self.own_precision(images):
            return self.autoencoder.encode_codes(images.to(self.dtype))

    def sample(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Codes are their own latents: the identity."""
        return moments

    def decode(self, latents: Tensor) -> Tensor:
        """int64 codes (B, h, w) -> float32 images (B, 3, h·f, w·f) in [-1, 1], from the exact codebook vectors."""
        if latents.ndim != 3:
            raise ValueError(f"VQTokenizer.decode takes codes (B, h, w), got shape {tuple(latents.shape)}")
        with self.own_precision(latents):
            images = self.autoencoder.decode_codes(latents)  # (B, 3, H, W)
        return images.float().clamp(-1, 1)
