"""Strict renaming of taming / LDM autoencoder state dicts into diffusers' VQModel / AutoencoderKL names.

The released autoencoders of taming-transformers (MaskGIT's VQGAN f16-1024), latent diffusion and
MAR (KL-16) name their blocks `encoder.down.N.block.M`, `encoder.down.N.attn.M`, `mid.block_1`,
`mid.attn_1`, `decoder.up.N...` (up levels counted from the lowest resolution) and keep attention
projections as 1×1 convolutions. diffusers counts decoder levels from the top, names attention
`group_norm`/`to_q`/`to_k`/`to_v`/`to_out.0` with linear weights, and says `conv_shortcut` for
`nin_shortcut`, `conv_norm_out` for `norm_out`.

diffusers' own `convert_ldm_vae_checkpoint` covers only SD-VAE's layout: it leaves attention inside
down/up blocks (`encoder.down.4.attn.*`, present in MaskGIT's and MAR's files) under their LDM
names and silently drops every key it does not know (`quantize.embedding.weight`). This converter
renames by rule and accounts for every source tensor: each one is renamed exactly once, or the
conversion fails naming the keys no rule covers (`ignore` drops named prefixes on request, e.g. the
`loss.` discriminator/LPIPS weights of a full taming training checkpoint, and logs them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["ldm_to_diffusers", "is_ldm_layout", "UnmappedKeysError"]

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut", "conv_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP_LEVEL = {"quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias",
              "quantize.embedding.weight"}


class UnmappedKeysError(KeyError):
    """Source keys that no LDM -> diffusers rule covers."""


def is_ldm_layout(keys: Sequence[str] | Mapping[str, object]) -> bool:
    """True when the keys look like taming / LDM autoencoder names (`encoder.down.0.block.0...`)."""
    return any(re.match(r"(encoder\.down|decoder\.up)\.\d+\.", k) or ".mid.block_1." in k for k in keys)


def _rename_block(kind: str, name: str, rest: str) -> str | None:
    """`<name>.<param>` inside a resnet (kind 'resnet') or attention (kind 'attn') block, diffusers' name."""
    table = _RESNET if kind == "resnet" else _ATTENTION
    layer, _, param = rest.partition(".")
    if layer not in table or param not in ("weight", "bias"):
        return None
    return f"{name}.{table[layer]}.{param}"


def _rename(key: str, num_up: int) -> tuple[str, str] | None:
    """(diffusers key, block kind) for one LDM key, or None when no rule covers it."""
    if key in _TOP_LEVEL:
        return key, "plain"
    match = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key)
    if match:
        part, layer, param = match.groups()
        return f"{part}.{'conv_norm_out' if layer == 'norm_out' else layer}.{param}", "plain"
    match = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)", key)
    if match:
        part, block, rest = match.groups()
        if block == "attn_1":
            new = _rename_block("attn", f"{part}.mid_block.attentions.0", rest)
            return (new, "attn") if new else None
        new = _rename_block("resnet", f"{part}.mid_block.resnets.{int(block[-1]) - 1}", rest)
        return (new, "resnet") if new else None
    match = re.fullmatch(r"encoder\.down\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key)
    if match:
        level, kind, index, rest = match.groups()
        sub = "resnets" if kind == "block" else "attentions"
        kind = "resnet" if kind == "block" else "attn"
        new = _rename_block(kind, f"encoder.down_blocks.{level}.{sub}.{index}", rest)
        return (new, kind) if new else None
    match = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if match:
        return f"encoder.down_blocks.{match[1]}.downsamplers.0.conv.{match[2]}", "plain"
    match = re.fullmatch(r"decoder\.up\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key)
    if match:
        level, kind, index, rest = match.groups()
        block = num_up - 1 - int(level)  # LDM counts up levels from the bottom, diffusers from the top
        sub = "resnets" if kind == "block" else "attentions"
        kind = "resnet" if kind == "block" else "attn"
        new = _rename_block(kind, f"decoder.up_blocks.{block}.{sub}.{index}", rest)
        return (new, kind) if new else None
    match = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key)
    if match:
        return f"decoder.up_blocks.{num_up - 1 - int(match[1])}.upsamplers.0.conv.{match[2]}", "plain"
    return None


def ldm_to_diffusers(state: Mapping[str, Tensor], prefix: str = "", ignore: Sequence[str] = ()) -> dict[str, Tensor]:
    """Rename a taming / LDM autoencoder state dict to diffusers' VQModel / AutoencoderKL names.

    `prefix` is stripped from every key first (e.g. "first_stage_model." for a full LDM checkpoint;
    keys without it are an error). Keys starting with one of `ignore` are dropped and logged. Every
    other key must be renamed by a rule: unknown keys raise `UnmappedKeysError` naming them.
    Attention q/k/v/proj_out weights are 1×1 convs (C, C, 1, 1) in LDM files and become linear
    weights (C, C); everything else keeps its shape.
    """
    if prefix:
        outside = [k for k in state if not k.startswith(prefix)]
        if outside:
            raise UnmappedKeysError(f"{len(outside)} keys lack the prefix {prefix!r}: {outside[:5]}")
        state = {k[len(prefix):]: v for k, v in state.items()}
    dropped = [k for k in state if any(k.startswith(p) for p in ignore)]
    if dropped:
        log.info("ldm_to_diffusers: dropping %d keys under %s as asked (e.g. %s)", len(dropped), list(ignore),
                 dropped[:3])
    levels = [int(m[1]) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    num_up = max(levels) + 1 if levels else 0
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if key in dropped:
            continue
        renamed = _rename(key, num_up)
        if renamed is None:
            unmapped.append(key)
            continue
        new, kind = renamed
        if new in out:
            raise UnmappedKeysError(f"two source keys map to {new!r} (the second is {key!r})")
        if kind == "attn" and new.endswith(".weight") and value.ndim > 2:
            if any(d != 1 for d in value.shape[2:]):
                raise ValueError(f"{key}: attention projection of shape {tuple(value.shape)} is not a 1x1 conv")
            value = value.reshape(value.shape[0], value.shape[1])  # (C, C, 1, 1) conv -> (C, C) linear
        out[new] = value
    if unmapped:
        raise UnmappedKeysError(
            f"{len(unmapped)} of {len(state)} keys have no taming/LDM -> diffusers rule: {unmapped[:5]}; if they "
            "are not autoencoder weights (a training checkpoint's `loss.` terms), pass them in `ignore`"
        )
    return out
