"""LlamaGen's VQ-16 / VQ-8 files load strictly into visgen's VQ tokenizer: every key renamed once, the
`quantize.codebook_used` buffer dropped by name, anything unknown refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from visgen.tokenizers import VQTokenizer
from visgen.tokenizers.ldm_keys import UnmappedKeysError
from visgen.tokenizers.llamagen_keys import CODEBOOK_USED, llamagen_vq_to_diffusers

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT.parent / "shared" / "reference" / "manifests"
pytestmark = pytest.mark.skipif(not (MANIFESTS / "_index.json").is_file(), reason=f"no manifests at {MANIFESTS}")


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((MANIFESTS / f"LlamaGen_VQ-{name}-tokenizer.json").read_text()).items()}


def tokenizer_cfg(name: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "model" / "tokenizer"), version_base="1.3"):
        return compose(f"llamagen_vq{name}")


@pytest.mark.parametrize("name", ["16", "8"])
def test_every_released_key_maps_onto_the_diffusers_layout_exactly(name):
    with torch.device("meta"):
        net = instantiate(tokenizer_cfg(name).autoencoder)
    official = {k: torch.empty(s, device="meta") for k, s in manifest(name).items()}
    converted = llamagen_vq_to_diffusers(official)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert len(converted) == len(official) - 1  # every key but the usage buffer


def test_a_released_vq16_checkpoint_loads_with_each_tensor_where_it_belongs(tmp_path, caplog):
    weights = {k: torch.full((), 0.25 * i).expand(s) for i, (k, s) in enumerate(manifest("16").items())}
    weights[CODEBOOK_USED] = torch.arange(65536.0) % 300  # the last 65,536 codes seen in training
    torch.save({"model": weights, "steps": 10}, tmp_path / "vq_ds16_c2i.pt")
    cfg = tokenizer_cfg("16")
    caplog.set_level(logging.INFO)
    tok = instantiate(cfg, pretrained=str(tmp_path / "vq_ds16_c2i.pt"))
    assert isinstance(tok, VQTokenizer) and tok.vocab_size == 16384 and tok.latent_shape(256) == (16, 16)
    assert tok.id.startswith("llamagen-vq16@")
    assert "quantize.codebook_used" in caplog.text and "300 distinct codes" in caplog.text
    state = tok.autoencoder.state_dict()
    pairs = {  # LlamaGen name -> diffusers name (attention 1x1 convs become linear weights)
        "encoder.conv_blocks.4.attn.1.q.weight": "encoder.down_blocks.4.attentions.1.to_q.weight",
        "encoder.conv_blocks.2.downsample.conv.bias": "encoder.down_blocks.2.downsamplers.0.conv.bias",
        "encoder.conv_blocks.4.res.0.nin_shortcut.weight": "encoder.down_blocks.4.resnets.0.conv_shortcut.weight",
        "encoder.mid.1.proj_out.weight": "encoder.mid_block.attentions.0.to_out.0.weight",
        "decoder.mid.2.conv1.weight": "decoder.mid_block.resnets.1.conv1.weight",
        "decoder.conv_blocks.0.attn.2.norm.weight": "decoder.up_blocks.0.attentions.2.group_norm.weight",
        "decoder.conv_blocks.0.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.conv_blocks.4.res.2.conv2.bias": "decoder.up_blocks.4.resnets.2.conv2.bias",
        "encoder.norm_out.weight": "encoder.conv_norm_out.weight",
        "quantize.embedding.weight": "quantize.embedding.weight",
    }
    for official, ours in pairs.items():
        assert torch.equal(state[ours].flatten(), weights[official].flatten()), (official, ours)


def test_an_unknown_key_is_refused_by_name():
    official = {k: torch.empty(s, device="meta") for k, s in manifest("8").items()}
    official["encoder.conv_blocks.0.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(UnmappedKeysError, match="conv_blocks.0.extra"):
        llamagen_vq_to_diffusers(official)
