"""MaskGIT presets: the published recipes, the released files' exact layouts, strict loading through load_official,
and the VQGAN tokenizer's release converted with its training-only tensors named and dropped."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from visgen.nn.halton_maskgit import halton_key_map
from visgen.nn.maskgit import taming_vqgan_keys, v1_key_map
from visgen.official import LayoutMismatchError, compose_experiment, load_official, preset_layout

MANIFESTS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "manifests"
needs_manifests = pytest.mark.skipif(not (MANIFESTS / "_index.json").is_file(),
                                     reason=f"reference manifests not found at {MANIFESTS}")
#: preset -> (_index.json entry, manifest file or None, the key map of its family)
RELEASES = {
    "maskgit_b": ("maskgit-pytorch-v1/MaskTransformer-base-256", "maskgit-pytorch-v1_MaskTransformer-base-256.json"),
    "maskgit_b_512": ("maskgit-pytorch-v1/MaskTransformer-base-512", None),
    "halton_maskgit_l_384": ("halton-maskgit/Transformer-large-384", "halton-maskgit_Transformer-large-384.json"),
}
KEY_MAPS = {"maskgit": v1_key_map, "halton": halton_key_map}


@functools.cache
def cfg_of(experiment: str):
    return compose_experiment(experiment)


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((MANIFESTS / name).read_text()).items()}


@needs_manifests
@pytest.mark.parametrize("experiment", sorted(RELEASES))
def test_preset_has_the_official_parameter_count_and_the_released_layout(experiment):
    entry_name, manifest_name = RELEASES[experiment]
    entry = json.loads((MANIFESTS / "_index.json").read_text())[entry_name]
    layout = preset_layout(experiment)
    with torch.device("meta"):
        net = instantiate(cfg_of(experiment).model.net)
    assert sum(p.numel() for p in net.parameters()) == entry["n_params"]
    assert len(layout) == entry["n_state_dict_keys"]
    if manifest_name:
        official = {k: torch.empty(s, device="meta") for k, s in manifest(manifest_name).items()}
        mapped = KEY_MAPS[experiment.split("_")[0]](official)
        assert {k: tuple(v.shape) for k, v in mapped.items()} == layout


def test_maskgit_b_carries_the_v1_recipe():
    cfg = cfg_of("maskgit_b")
    assert (cfg.data.image_size, cfg.data.batch_global, cfg.data.num_classes) == (256, 512, 1000)
    model, opt = cfg.model, cfg.model.optimizer
    assert (model.schedule, model.loss_on, model.label_smoothing, model.label_drop_prob) == ("arccos", "all", 0.1, 0.1)
    assert (opt.lr, list(opt.betas), opt.weight_decay, opt.decay_min_ndim) == (1e-4, [0.9, 0.96], 1e-5, 0)
    assert (opt.warmup_steps, opt.schedule, model.ema_decay) == (2500, "constant", 0.0)
    assert (cfg.trainer.gradient_clip_val, cfg.trainer.max_steps, model.net.dropout) == (1.0, 755200, 0.1)
    s = cfg.sampling
    assert (s.num_steps, s.schedule, s.order, s.temperature, s.gumbel_temperature, s.cfg_scale, s.cfg_schedule) == (
        8, "arccos", "confidence", 1.0, 4.5, 3.0, "linear")
    assert cfg.model.tokenizer.autoencoder.num_codes == model.net.codebook_size == 1024
    assert cfg_of("maskgit_b_512").sampling.num_steps == 15  # v1 README: 15 steps at 512 px


def test_halton_preset_samples_with_the_halton_order_and_constant_guidance():
    cfg = cfg_of("halton_maskgit_l_384")
    s, model = cfg.sampling, cfg.model
    assert (s.order, s.spacing, s.num_steps) == ("halton", "cumulative", 32)
    assert (s.cfg_schedule, s.cfg_scale) == ("constant", 1.5)
    assert (model.loss_on, model.label_smoothing, model.optimizer.weight_decay) == ("all", 0.0, 0.03)
    assert cfg.model.tokenizer.autoencoder.num_codes == model.net.codebook_size == 16384
    # the released vq_ds16_c2i.pt carries LlamaGen's names: the LlamaGen converter, not key_format auto
    assert cfg.model.tokenizer.key_format == "visgen.tokenizers.llamagen_keys.llamagen_vq_to_diffusers"


@pytest.fixture(scope="module")
def v1_release(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A file in the v1 Trainer's layout with the base-256 manifest's keys, tensor i holding the value i."""
    if not (MANIFESTS / "_index.json").is_file():
        pytest.skip(f"reference manifests not found at {MANIFESTS}")
    state = {k: torch.full((), float(i)).expand(s)
             for i, (k, s) in enumerate(manifest(RELEASES["maskgit_b"][1]).items())}
    path = tmp_path_factory.mktemp("maskgit") / "MaskGIT_ImageNet_256.pth"
    torch.save({"iter": 755200, "global_epoch": 300, "model_state_dict": state, "optimizer_state_dict": {}}, path)
    return path, state


def test_the_v1_release_loads_strictly_through_load_official(v1_release, caplog):
    caplog.set_level(logging.INFO, logger="visgen.official")
    path, state = v1_release
    net = load_official("maskgit_b", path)
    loaded = net.state_dict()
    assert loaded["blocks.11.attn.qkv.weight"][0, 0] == state["transformer.layers.11.0.fn.mha.in_proj_weight"][0, 0]
    assert loaded["bias"][0, 0] == state["bias"][0, 0] and not net.training
    assert "'model_state_dict' weights" in caplog.text


def test_a_256_release_loaded_as_the_512_preset_is_refused_naming_the_preset_it_fits(v1_release, monkeypatch):
    monkeypatch.setattr("visgen.official.known_experiments", lambda: sorted(RELEASES))  # search the MaskGIT presets
    with pytest.raises(LayoutMismatchError) as info:
        load_official("maskgit_b_512", v1_release[0])
    message = str(info.value)
    assert "shape mismatch: pos_emb: file (1, 257, 768) vs net (1, 1025, 768)" in message
    assert "this file matches experiment=maskgit_b" in message


@needs_manifests
def test_the_vqgan_release_converts_with_its_loss_tensors_named_and_dropped(caplog):
    caplog.set_level(logging.INFO)
    cfg = compose_experiment("maskgit_b", ["model.tokenizer.pretrained=unused"])
    assert cfg.model.tokenizer.key_format == "visgen.nn.maskgit.taming_vqgan_keys"
    with torch.device("meta"):
        autoencoder = instantiate(cfg.model.tokenizer.autoencoder)
    layout = manifest("maskgit-pytorch-v1_taming-vqgan-f16-1024.json")
    release = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    release["loss.discriminator.main.0.weight"] = torch.empty(64, 3, 4, 4, device="meta")  # taming's training terms
    release["loss.perceptual_loss.lin0.model.1.weight"] = torch.empty(1, 64, 1, 1, device="meta")
    converted = taming_vqgan_keys(release)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in autoencoder.state_dict().items()}
    assert sum(p.numel() for p in autoencoder.parameters()) == 72_141_699
    assert "dropping 2 keys under ['loss.']" in caplog.text
