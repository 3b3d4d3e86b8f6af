"""The VQ tokenizer (README convention 5) on tiny random VQAutoencoders: codes, exact decoding (what
diffusers' VQModel gives only when told not to re-quantise), export and strict reloading by path, the id,
and the official layouts' parameter counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from visgen.tokenizers import Tokenizer, VQTokenizer
from visgen.tokenizers.autoencoders import VQAutoencoder
from visgen.tokenizers.vq import convert_keys, save_vq_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=8, num_codes=64, code_dim=4,
            norm_num_groups=8, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
            up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"))


def _tiny(l2: bool = True, seed: int = 0) -> VQAutoencoder:
    torch.manual_seed(seed)
    net = VQAutoencoder(**TINY, l2_normalized=l2)
    with torch.no_grad():  # codes of unequal norms: l2-normalised and raw lookups then disagree
        net.quantize.embedding.weight.mul_(torch.rand(64, 1) * 2 + 0.1)
    return net.eval()


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, H, W)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[VQAutoencoder, Path]:
    net = _tiny()
    return net, save_vq_tokenizer(net, tmp_path_factory.mktemp("vq") / "tokenizer.safetensors", "tiny_vq")


@pytest.mark.parametrize("layout, count", [("llamagen_vq16", 71_883_403), ("llamagen_vq8", 70_109_835)])
def test_llamagen_layouts_have_the_official_parameter_counts(layout: str, count: int):
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "model" / "tokenizer" / "layout"), version_base="1.3"):
        cfg = compose(layout)
    with torch.device("meta"):
        net = instantiate(cfg)
    assert sum(p.numel() for p in net.parameters()) == count
    assert net.quantize.l2_normalized and tuple(net.quantize.embedding.weight.shape) == (16384, 8)


def test_encode_gives_int64_codes_and_decode_is_exact(exported, images):
    net, path = exported
    tok = VQTokenizer(str(path))
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 64 and tok.latent_shape(16) == (8, 8)
    codes = tok.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (3, 8, 8)
    assert torch.equal(tok.sample(codes), codes)
    with torch.no_grad():
        recon, quantized = net(images)  # what training decodes
    assert torch.equal(quantized.codes, codes)
    assert torch.equal(tok.decode(codes), recon.clamp(-1, 1))


def test_decoding_matches_diffusers_vqmodel_only_without_requantisation(exported, images):
    from diffusers import VQModel

    net, path = exported
    tok = VQTokenizer(str(path))
    ref = VQModel(**{k: v for k, v in net.config.items() if k not in ("num_codes", "code_dim", "l2_normalized", "beta",
                                                                      "entropy_weight", "entropy_temperature")},
                  num_vq_embeddings=64, vq_embed_dim=4).eval()
    ref.load_state_dict(net.state_dict(), strict=True)  # same names: the weights are interchangeable
    codes = tok.encode(images)
    vectors = net.quantize.lookup(codes)
    with torch.no_grad():
        exact = ref.decode(vectors, force_not_quantize=True).sample.clamp(-1, 1)
        requantised = ref.decode(vectors).sample.clamp(-1, 1)  # diffusers' default: raw Euclidean lookup again
    assert torch.equal(tok.decode(codes), exact)
    assert (requantised - exact).abs().max() > 1e-2


def test_export_reloads_strictly_with_a_weights_id(exported, tmp_path: Path):
    net, path = exported
    tok = VQTokenizer(str(path))
    assert tok.id.startswith("tiny_vq@") and len(tok.id) == len("tiny_vq@") + 12
    assert VQTokenizer(str(path)).id == tok.id
    assert tok.state_dict() == {} and not any(p.requires_grad for p in tok.autoencoder.parameters())
    other = _tiny(seed=1)
    assert VQTokenizer(str(save_vq_tokenizer(other, tmp_path / "b.safetensors", "tiny_vq"))).id != tok.id
    assert VQTokenizer(str(path), name="renamed").id.startswith("renamed@")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in net.state_dict().items() if not k.startswith("decoder.conv_out")}
    save_file(state, str(bad))
    with pytest.raises(ValueError, match="decoder.conv_out"):
        VQTokenizer(str(bad), autoencoder=_tiny())
    with pytest.raises(ValueError, match="not a visgen-exported"):
        VQTokenizer(str(bad))
    with pytest.raises(FileNotFoundError, match="demo_vq"):
        VQTokenizer(str(tmp_path / "missing.safetensors"))


def test_loads_visgen_checkpoints_and_diffusers_directories(exported, tmp_path: Path, images):
    from diffusers import VQModel

    net, path = exported
    ema = _tiny(seed=2)
    ckpt = {"state_dict": {**{f"net.{k}": v for k, v in net.state_dict().items()},
                           **{f"ema.{k}": v for k, v in ema.state_dict().items()}},
            "visgen": {"ema_prefix": "ema."}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    tok = VQTokenizer(str(tmp_path / "last.ckpt"), autoencoder=_tiny(seed=3))
    assert torch.equal(tok.encode(images), ema.encode_codes(images))  # the EMA weights were taken
    plain = _tiny(l2=False)
    ref = VQModel(**{k: v for k, v in TINY.items() if k not in ("num_codes", "code_dim")},
                  num_vq_embeddings=64, vq_embed_dim=4)
    ref.load_state_dict(plain.state_dict())
    ref.save_pretrained(tmp_path / "diffusers-vq")
    tok = VQTokenizer(str(tmp_path / "diffusers-vq"), autoencoder=_tiny(l2=False, seed=4))
    assert torch.equal(tok.encode(images), plain.encode_codes(images))


def test_codes_do_not_depend_on_the_trainers_precision(exported, images):
    tok = VQTokenizer(str(exported[1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = tok.encode(images)
    assert torch.equal(codes, tok.encode(images))
    tok.to(torch.bfloat16)  # the held net follows its parent
    assert tok.dtype == torch.bfloat16 and tok.decode(codes).dtype == torch.float32


def test_auto_key_format_recognises_ldm_names():
    import json

    manifest_path = ROOT.parent / "shared/reference/manifests/maskgit-pytorch-v1_taming-vqgan-f16-1024.json"
    manifest = json.loads(manifest_path.read_text())
    state = {k: torch.empty(s, device="meta") for k, s in manifest.items()}
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "model" / "tokenizer" / "layout"), version_base="1.3"):
        cfg = compose("taming_vqgan_f16_1024")
    with torch.device("meta"):
        net = instantiate(cfg)
    converted, used = convert_keys(state, net.state_dict())
    assert used == "ldm" and set(converted) == set(net.state_dict())


def test_hydra_config_builds_the_tokenizer_from_an_exported_file(exported):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=demo_sit", "model/tokenizer=vq",
                                          f"model.tokenizer.pretrained={exported[1]}"])
    tok = instantiate(cfg.model.tokenizer)
    assert isinstance(tok, VQTokenizer) and tok.id.startswith("tiny_vq@")
    with pytest.raises(ValueError, match="image_size=15"):
        tok.latent_shape(15)
