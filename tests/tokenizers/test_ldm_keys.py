"""Strict taming/LDM -> diffusers renaming: the released MAR KL-16 and MaskGIT VQGAN layouts land exactly
on visgen's nets (official parameter counts), every source tensor is accounted for, and the renaming
agrees with diffusers' own converter wherever that one works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from visgen.official import LayoutDiff, load_strict
from visgen.tokenizers.ldm_keys import UnmappedKeysError, is_ldm_layout, ldm_to_diffusers

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT.parent / "shared" / "reference" / "manifests"
# layout config -> (manifest, official parameter count from _index.json)
RELEASES = {
    "taming_vqgan_f16_1024": ("maskgit-pytorch-v1_taming-vqgan-f16-1024.json", 72_141_699),
    "mar_kl16": ("mar_kl16_vae.json", 66_456_019),
}


def _manifest(name: str) -> dict[str, list[int]]:
    return json.loads((MANIFESTS / name).read_text())


def _build_layout(layout: str, device: str = "meta") -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "model" / "tokenizer" / "layout"), version_base="1.3"):
        cfg = compose(layout)
    with torch.device(device):
        return instantiate(cfg)


def _tiny_values(manifest: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The manifest's keys with small distinct tensors of the same rank (renaming does not look at sizes)."""
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(*(2 if d > 1 else 1 for d in shape), generator=gen) for k, shape in manifest.items()}


@pytest.mark.parametrize("layout", sorted(RELEASES))
def test_released_layout_converts_onto_the_net_with_the_official_count(layout: str):
    manifest_name, count = RELEASES[layout]
    manifest = _manifest(manifest_name)
    net = _build_layout(layout)
    assert sum(p.numel() for p in net.parameters()) == count
    assert is_ldm_layout(manifest)
    meta = {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}
    converted = ldm_to_diffusers(meta)
    assert len(converted) == len(manifest)  # nothing dropped
    diff = LayoutDiff.between({k: tuple(v.shape) for k, v in converted.items()},
                              {k: tuple(v.shape) for k, v in net.state_dict().items()})
    assert diff.ok, diff.describe({k: tuple(v.shape) for k, v in net.state_dict().items()})


def test_maskgit_vqgan_loads_strictly_with_attention_reshaped():
    manifest = _manifest(RELEASES["taming_vqgan_f16_1024"][0])
    state = {k: torch.empty(shape) for k, shape in manifest.items()}  # values unused
    state["encoder.down.4.attn.1.q.weight"] = torch.randn(512, 512, 1, 1)
    net = _build_layout("taming_vqgan_f16_1024")
    load_strict(net, ldm_to_diffusers(state), "manifest-shaped MaskGIT VQGAN")
    q = net.encoder.down_blocks[4].attentions[1].to_q.weight
    assert q.shape == (512, 512) and torch.equal(q, state["encoder.down.4.attn.1.q.weight"][:, :, 0, 0])


def test_decoder_levels_are_reversed_and_every_tensor_is_kept():
    manifest = _manifest(RELEASES["taming_vqgan_f16_1024"][0])
    state = _tiny_values(manifest)
    out = ldm_to_diffusers(state)
    pairs = {  # diffusers name <- LDM name
        "decoder.up_blocks.0.attentions.2.to_v.weight": "decoder.up.4.attn.2.v.weight",
        "decoder.up_blocks.4.resnets.0.conv1.weight": "decoder.up.0.block.0.conv1.weight",
        "decoder.up_blocks.1.upsamplers.0.conv.bias": "decoder.up.3.upsample.conv.bias",
        "encoder.down_blocks.2.resnets.0.conv_shortcut.weight": "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.conv_norm_out.weight": "encoder.norm_out.weight",
        "quantize.embedding.weight": "quantize.embedding.weight",
    }
    for new, old in pairs.items():
        assert torch.equal(out[new], state[old].reshape(out[new].shape)), new
    assert out["decoder.up_blocks.0.attentions.2.to_v.weight"].ndim == 2  # 1x1 conv -> linear
    assert len(out) == len(state)


def test_agrees_with_diffusers_converter_where_that_one_covers_the_layout():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = _tiny_values(_manifest(RELEASES["mar_kl16"][0]))
    ours = ldm_to_diffusers(state)
    theirs = convert_ldm_vae_checkpoint(state, {"down_block_types": [0] * 5, "up_block_types": [0] * 5})
    common = sorted(set(ours) & set(theirs))
    assert len(common) == len(ours) - 20  # all but the encoder's block attention (2 blocks x 5 weights + 5 biases)
    for key in common:
        assert torch.equal(ours[key], theirs[key]), key
    # diffusers leaves the block attention under LDM names: a strict load of its result would fail.
    assert sorted(set(theirs) - set(ours))[0].startswith("encoder.down.4.attn.")


def test_unknown_keys_fail_naming_them_unless_ignored():
    state = _tiny_values(_manifest(RELEASES["mar_kl16"][0]))
    state["loss.discriminator.main.0.weight"] = torch.zeros(1)
    with pytest.raises(UnmappedKeysError, match="loss.discriminator.main.0.weight"):
        ldm_to_diffusers(state)
    assert len(ldm_to_diffusers(state, ignore=("loss.",))) == len(state) - 1
    prefixed = {f"first_stage_model.{k}": v for k, v in state.items() if not k.startswith("loss.")}
    assert len(ldm_to_diffusers(prefixed, prefix="first_stage_model.")) == len(prefixed)
    with pytest.raises(UnmappedKeysError, match="lack the prefix"):
        ldm_to_diffusers(state, prefix="first_stage_model.")
