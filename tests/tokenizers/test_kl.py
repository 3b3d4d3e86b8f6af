"""The SD-VAE tokenizer on a tiny random diffusers AutoencoderKL saved to disk: shapes, the posterior
draw, the scale/shift round trip, offline loading errors, no VAE weights in checkpoints, and the Hydra
override that selects it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from visgen.tokenizers import KLTokenizer, SDVAETokenizer, Tokenizer

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised AutoencoderKL (2 blocks: downsampling 2) saved with save_pretrained."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(vae_dir: Path) -> SDVAETokenizer:
    return SDVAETokenizer(str(vae_dir), local_files_only=True)


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def test_loads_frozen_from_a_local_directory(tok: SDVAETokenizer):
    assert isinstance(tok, Tokenizer) and KLTokenizer is SDVAETokenizer
    assert not tok.vae.training and not any(p.requires_grad for p in tok.vae.parameters())
    assert tok.vocab_size is None and (tok.scale, tok.shift) == (0.18215, 0.0)


def test_id_is_the_weights_basename_and_scale(tok: SDVAETokenizer):
    assert tok.id == "tiny-vae@0.18215"
    assert SDVAETokenizer(vae=tok.vae).id == "sd-vae-ft-ema@0.18215"
    assert SDVAETokenizer("/x/sd-vae-ft-mse/", vae=tok.vae, shift=0.1).id == "sd-vae-ft-mse@0.18215,shift=0.1"


def test_latent_shape_follows_the_downsampling_of_the_config(tok: SDVAETokenizer):
    factor = 2 ** (len(tok.vae.config.block_out_channels) - 1)
    assert factor == 2
    assert tok.latent_shape(32) == (4, 32 // factor, 32 // factor)
    with pytest.raises(ValueError, match="multiple"):
        tok.latent_shape(33)


def test_encode_returns_mean_and_logvar(tok: SDVAETokenizer, images: torch.Tensor):
    moments = tok.encode(images)  # (B, 2C, h, w)
    assert moments.shape == (2, 8, 8, 8) and moments.dtype == torch.float32
    torch.testing.assert_close(moments, tok.vae.encode(images).latent_dist.parameters)


def test_sample_is_mean_plus_std_noise_normalised_and_reproducible(tok: SDVAETokenizer, images: torch.Tensor):
    moments = tok.encode(images)
    z1 = tok.sample(moments, torch.Generator().manual_seed(7))
    z2 = tok.sample(moments, torch.Generator().manual_seed(7))
    assert z1.shape == (2, 4, 8, 8)
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, tok.sample(moments, torch.Generator().manual_seed(8)))

    mean, logvar = moments.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps - tok.shift) * tok.scale)
    # The same draw as diffusers' own posterior sample with the same generator.
    reference = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, reference * tok.scale)


def test_sample_statistics_match_the_posterior(tok: SDVAETokenizer):
    scaled = SDVAETokenizer(vae=tok.vae, scale=0.5, shift=0.25)
    mean, std = 1.0, 2.0
    moments = torch.cat([torch.full((64, 4, 16, 16), mean), torch.full((64, 4, 16, 16), 2 * math.log(std))], dim=1)
    z = scaled.sample(moments, torch.Generator().manual_seed(0))  # 65,536 draws
    assert abs(z.mean().item() - (mean - 0.25) * 0.5) < 0.02
    assert abs(z.std().item() - std * 0.5) < 0.02


def test_decode_shape_and_range(tok: SDVAETokenizer):
    latents = 5 * torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = tok.decode(latents)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1


def test_scale_shift_round_trip(tok: SDVAETokenizer, images: torch.Tensor):
    """decode(zero-noise sample) is the VAE's decode of the posterior mean: scale and shift cancel."""
    scaled = SDVAETokenizer(vae=tok.vae, scale=0.7, shift=-0.3)
    moments = scaled.encode(images)
    mean, _ = moments.chunk(2, dim=1)
    no_noise = torch.cat([mean, torch.full_like(mean, -1e9)], dim=1)  # logvar clamps to -30: std 3e-7
    latents = scaled.sample(no_noise, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, (mean + 0.3) * 0.7, atol=1e-5, rtol=0)
    expected = tok.vae.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(scaled.decode(latents), expected, atol=1e-4, rtol=1e-4)


def test_vae_runs_in_its_own_dtype_under_autocast(tok: SDVAETokenizer, images: torch.Tensor):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moments = tok.encode(images)
        decoded = tok.decode(torch.zeros(1, 4, 8, 8))
    assert torch.equal(moments, tok.encode(images))
    assert torch.equal(decoded, tok.decode(torch.zeros(1, 4, 8, 8)))


def test_dtype_option(vae_dir: Path, images: torch.Tensor):
    bf16 = SDVAETokenizer(str(vae_dir), dtype="bfloat16")
    assert bf16.vae.dtype == torch.bfloat16 and bf16.encode(images).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        SDVAETokenizer(str(vae_dir), dtype="int8")


def test_no_vae_weights_in_any_state_dict(tok: SDVAETokenizer, images: torch.Tensor):
    assert tok.state_dict() == {} and list(tok.parameters()) == []
    tok.load_state_dict({}, strict=True)

    parent = nn.Module()
    parent.net = nn.Linear(2, 2)
    parent.tokenizer = SDVAETokenizer(vae=AutoencoderKL.from_config(tok.vae.config))
    keys = set(parent.state_dict())
    assert keys == {"net.weight", "net.bias"}
    parent.load_state_dict(parent.state_dict(), strict=True)
    assert sum(p.numel() for p in parent.parameters()) == 6

    # The hidden VAE still follows the parent's .to()/.train().
    parent.to(torch.float64)
    assert parent.tokenizer.vae.dtype == torch.float64
    assert parent.tokenizer.encode(images.double()).dtype == torch.float32
    parent.train()
    assert parent.tokenizer.training and not parent.tokenizer.vae.training


def test_a_missing_local_directory_names_the_fix(tmp_path: Path):
    missing = tmp_path / "sd-vae-ft-ema"
    with pytest.raises(FileNotFoundError, match="download") as err:
        SDVAETokenizer(str(missing))
    message = str(err.value)
    assert str(missing) in message and "model.tokenizer.pretrained=<dir>" in message
    assert "stabilityai/sd-vae-ft-ema" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.tokenizer.pretrained="):
        SDVAETokenizer(str(empty))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`:UserWarning")
def test_an_offline_hub_name_is_not_downloaded_and_names_the_fix(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        SDVAETokenizer("visgen-test/no-such-vae")
    message = str(err.value)
    assert "visgen-test/no-such-vae" in message and "HF_HUB_OFFLINE=1" in message
    assert "download visgen-test/no-such-vae --local-dir <dir>" in message
    assert "model.tokenizer.pretrained=<dir>" in message


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("name", ["sd_vae_ema", "sd_vae_mse"])
def test_the_hydra_override_selects_the_sd_vae(name: str, vae_dir: Path):
    cfg = compose_train("experiment=demo_sit", f"model/tokenizer={name}")
    assert cfg.model.tokenizer._target_ == "visgen.tokenizers.SDVAETokenizer"
    assert cfg.model.tokenizer.pretrained == f"stabilityai/{name.replace('_', '-').replace('vae-', 'vae-ft-')}"
    assert cfg.model.tokenizer.scale == 0.18215
    tokenizer = instantiate(cfg.model.tokenizer, pretrained=str(vae_dir))
    assert isinstance(tokenizer, SDVAETokenizer) and tokenizer.latent_shape(32) == (4, 16, 16)


def test_a_sit_module_on_kl_latents_keeps_the_vae_out_of_its_checkpoint(vae_dir: Path):
    cfg = compose_train("experiment=demo_sit", "model/tokenizer=sd_vae_ema", f"model.tokenizer.pretrained={vae_dir}",
                        "model.net.in_channels=4", "model.net.input_size=16", "model.net.patch_size=2",
                        "sampling.num_steps=2")
    module = instantiate(cfg.model)
    assert module.tokenizer.id == "tiny-vae@0.18215"
    assert not any(k.startswith("tokenizer.") for k in module.state_dict())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    batch = module.make_batch({"image": images, "label": torch.tensor([0, 1])})
    assert batch["latents"].shape == (2, 4, 16, 16) and batch["images"].shape == (2, 3, 32, 32)
    samples = module.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 32, 32) and samples.dtype == torch.uint8
