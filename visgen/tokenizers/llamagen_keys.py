"""Strict renaming of LlamaGen's VQ tokenizer files (VQ-16, VQ-8) into diffusers' VQModel names.

LlamaGen's `tokenizer/tokenizer_image/vq_model.py` is taming's autoencoder with other container
names: a level is `conv_blocks.N` holding `res.M`, `attn.M` and `downsample` / `upsample`, the middle
is a list `mid.0` (resnet), `mid.1` (attention), `mid.2` (resnet), and decoder levels are numbered in
processing order (`decoder.conv_blocks.0` is the lowest resolution, taming's `decoder.up.{L-1}`).
`llamagen_vq_to_diffusers` rewrites those names into taming's and hands the result to
`visgen.tokenizers.ldm_keys.ldm_to_diffusers`, which accounts for every tensor (an unknown key is an
error) and reshapes the 1x1-conv attention projections into linear weights.

One key is not a weight: `quantize.codebook_used`, LlamaGen's persistent buffer of the last 65,536 code
indices seen in training (its codebook-usage statistic; an `nn.Parameter` registered as a buffer,
so every released file carries it). Decoding never reads it; it is dropped here by name and logged
with the usage it records. Select this converter with
`model.tokenizer.key_format=visgen.tokenizers.llamagen_keys.llamagen_vq_to_diffusers`
(conf/model/tokenizer/llamagen_vq16.yaml and llamagen_vq8.yaml do).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from torch import Tensor

from visgen.tokenizers.ldm_keys import ldm_to_diffusers

log = logging.getLogger(__name__)

__all__ = ["llamagen_vq_to_diffusers", "llamagen_to_taming", "CODEBOOK_USED"]

#: LlamaGen's usage ring buffer (not a weight): dropped, by name.
CODEBOOK_USED = "quantize.codebook_used"
_MID = {"0": "block_1", "1": "attn_1", "2": "block_2"}


def _decoder_levels(state: Mapping[str, Tensor]) -> int:
    """How many levels LlamaGen's decoder has (VQ-16: 5, VQ-8: 4)."""
    levels = {int(m[1]) for k in state if (m := re.match(r"decoder\.conv_blocks\.(\d+)\.", k))}
    return max(levels) + 1 if levels else 0


def llamagen_to_taming(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LlamaGen VQ names -> taming / LDM names (values untouched); keys already in taming form pass through.

    encoder.conv_blocks.N.{res,attn}.M -> encoder.down.N.{block,attn}.M; .downsample stays;
    decoder.conv_blocks.N -> decoder.up.{L-1-N} (.res -> .block, .upsample stays);
    {encoder,decoder}.mid.{0,1,2} -> mid.{block_1,attn_1,block_2}.
    """
    levels = _decoder_levels(state)
    out = {}
    for key, value in state.items():
        new = key
        match = re.match(r"(encoder|decoder)\.conv_blocks\.(\d+)\.(res|attn|downsample|upsample)\.(.*)$", key)
        if match:
            part, level, kind, rest = match.groups()
            container = "down" if part == "encoder" else "up"
            index = int(level) if part == "encoder" else levels - 1 - int(level)
            kind = "block" if kind == "res" else kind
            new = f"{part}.{container}.{index}.{kind}.{rest}"
        match = re.match(r"(encoder|decoder)\.mid\.([012])\.(.*)$", key)
        if match:
            new = f"{match[1]}.mid.{_MID[match[2]]}.{match[3]}"
        out[new] = value
    return out


def llamagen_vq_to_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A LlamaGen VQ state dict -> the names of visgen's `VQAutoencoder` (diffusers' VQModel + `quantize`).

    Drops `quantize.codebook_used` (logged); every other key is renamed exactly once or the conversion
    fails naming it (`ldm_to_diffusers`)."""
    state = dict(state)
    used = state.pop(CODEBOOK_USED, None)
    if used is not None:
        distinct = "?" if used.is_meta or not used.numel() else int(used.long().unique().numel())
        log.info("%s: dropped LlamaGen's training-time codebook-usage buffer (%d entries, %s distinct codes); "
                 "it is a statistic, not a weight", CODEBOOK_USED, used.numel(), distinct)
    return ldm_to_diffusers(llamagen_to_taming(state))
