"""MAR's KL-16 tokenizer: convert the released `kl16.ckpt` (LDM names) strictly into a diffusers directory.

    python -m visgen.paradigms.mar_kl16 --src pretrained_models/vae/kl16.ckpt --out pretrained/mar-kl16

The release (LTH14/mar util/download.py) stores `{"model": <state dict>}` in LDM names; the official code loads
it with `strict=False` (models/vae.py `init_from_ckpt`). Here every tensor is renamed by
`visgen.tokenizers.ldm_keys.ldm_to_diffusers` and loaded strictly into diffusers' AutoencoderKL in MAR's layout
(`conf/model/tokenizer/layout/mar_kl16.yaml`, 66,456,019 parameters): a missing, leftover or misshapen key is an
error naming it. The output directory is what `model/tokenizer=mar_kl16` loads (`model.tokenizer.pretrained`),
with scale 0.2325 set in the tokenizer config (engine_mar.py: `posterior.sample().mul_(0.2325)`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from visgen.official import CONF_DIR, load_strict, read_checkpoint
from visgen.tokenizers.autoencoders import KLAutoencoder
from visgen.tokenizers.ldm_keys import ldm_to_diffusers

__all__ = ["KL16_LAYOUT", "SCALE", "build_kl16", "load_kl16", "main"]

KL16_LAYOUT = CONF_DIR / "model" / "tokenizer" / "layout" / "mar_kl16.yaml"
SCALE = 0.2325  # engine_mar.py:65 and :159


def build_kl16(**overrides) -> KLAutoencoder:
    """An (untrained) KLAutoencoder in MAR's KL-16 layout; `overrides` replace layout keys (tests use tiny ones)."""
    cfg = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(KL16_LAYOUT)).items() if k != "_target_"}
    return KLAutoencoder(**{**cfg, **overrides})


def load_kl16(src: str | Path, ignore: Sequence[str] = (), **overrides) -> KLAutoencoder:
    """The KL-16 autoencoder holding the weights of `src` (the release's {"model": ...}, a raw LDM state dict, or
    a safetensors file), renamed and loaded strictly; `ignore` drops named key prefixes (e.g. "loss.")."""
    obj = read_checkpoint(src)
    state = obj["model"] if isinstance(obj.get("model"), dict) else dict(obj)
    with torch.device("meta"):
        vae = build_kl16(**overrides)
    load_strict(vae, ldm_to_diffusers(state, ignore=ignore), str(src))
    return vae.eval()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: convert the release into a diffusers AutoencoderKL directory."""
    parser = argparse.ArgumentParser(prog="python -m visgen.paradigms.mar_kl16", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="the released kl16.ckpt (or an LDM-named state dict)")
    parser.add_argument("--out", required=True, help="output directory (diffusers save_pretrained layout)")
    parser.add_argument("--ignore", nargs="*", default=(), help="key prefixes to drop, e.g. loss.")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{out} exists and is not empty; pass --overwrite to replace it")
    vae = load_kl16(args.src, args.ignore).to_diffusers()
    vae.register_to_config(scaling_factor=SCALE)  # documentation only: visgen's tokenizer config sets the scale
    vae.save_pretrained(out)
    print(f"wrote {out} ({sum(p.numel() for p in vae.parameters()):,} parameters); use model/tokenizer=mar_kl16 "
          f"model.tokenizer.pretrained={out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
