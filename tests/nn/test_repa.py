"""REPA's net: the official counts and layouts, REPA's time convention at the edge, projectors on block k's tokens,
strict loading of the released layouts (raw, train.py's {model, ema, ...}, legacy decoder_blocks)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch

from visgen.nn.dit import DiT
from visgen.nn.repa import REPASiT, renumber_legacy_blocks
from visgen.official import LayoutMismatchError, _build_on_meta, compose_experiment, load_official, preset_layout

MANIFESTS = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "manifests"
needs_manifests = pytest.mark.skipif(not (MANIFESTS / "_index.json").is_file(),
                                     reason=f"reference manifests not found at {MANIFESTS}")
INDEX_NAME = {"repa_sit_b_2": "REPA/SiT-B-2-repa-dinov2b-enc8", "repa_sit_l_2": "REPA/SiT-L-2-repa-dinov2b-enc8",
              "repa_sit_xl_2": "REPA/SiT-XL-2-repa-dinov2b-enc8"}
COUNTS = {"repa_sit_b_2": 137_845_008, "repa_sit_l_2": 465_955_600, "repa_sit_xl_2": 683_242_512}


def tiny_net(**kwargs) -> REPASiT:
    torch.manual_seed(0)
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10,
                encoder_depth=2, z_dims=(16, 8), projector_dim=24) | kwargs
    return REPASiT(**args)


def randomize(net: torch.nn.Module) -> torch.nn.Module:
    """Non-zero adaLN and output layers (zero at init), so forward comparisons mean something."""
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return net


# ----- presets --------------------------------------------------------------------------------------
@needs_manifests
@pytest.mark.parametrize("experiment", sorted(COUNTS))
def test_presets_have_the_official_counts_projector_included(experiment):
    entry = json.loads((MANIFESTS / "_index.json").read_text())[INDEX_NAME[experiment]]
    net = _build_on_meta(compose_experiment(experiment))
    total = sum(p.numel() for p in net.parameters())
    assert total == COUNTS[experiment] == entry["n_params"]
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == entry["frozen_param_keys"] == ["pos_embed"]
    assert len(net.state_dict()) == entry["n_state_dict_keys"]
    projector = sum(p.numel() for p in net.projectors.parameters())
    assert projector == entry.get("projector_params", projector)
    assert total - projector == entry.get("params_without_projector", total - projector)
    assert net.out_channels == 4 and net.encoder_depth == 8 and net.z_dims == [768]


@needs_manifests
@pytest.mark.parametrize("experiment, manifest", [("repa_sit_xl_2", "REPA_SiT-XL-2-repa-dinov2b-enc8.json"),
                                                  ("repa_sit_b_2", "REPA_SiT-B-2-repa-dinov2b-enc8.json")])
def test_preset_layout_is_the_released_files(experiment, manifest):
    expected = {k: tuple(v) for k, v in json.loads((MANIFESTS / manifest).read_text()).items()}
    assert preset_layout(experiment) == expected


def test_preset_carries_repas_recipe():
    cfg = compose_experiment("repa_sit_xl_2")
    opt = cfg.model.optimizer
    assert (opt.lr, tuple(opt.betas), opt.weight_decay, opt.schedule, opt.warmup_steps) == (1e-4, (0.9, 0.999), 0.0,
                                                                                           "constant", 0)
    assert (cfg.data.batch_global, cfg.data.random_flip, cfg.model.ema_decay, cfg.model.proj_coeff) == (256, False,
                                                                                                     0.9999, 0.5)
    assert cfg.data._target_.endswith("CachedDataModule") and cfg.data.keep_image  # the cache's crop, no flips
    assert (cfg.trainer.gradient_clip_val, cfg.trainer.max_steps) == (1.0, 4_000_000)
    s = cfg.sampling
    assert s._target_ == "visgen.diffusion.sde.SDESampler"
    assert (s.num_steps, s.cfg_scale, list(s.guidance_interval), s.guided_channels) == (250, 1.8, [0.3, 1.0], None)
    assert (s.last_step, s.last_step_size, s.state_dtype, s.diffusion_form) == ("Mean", 0.04, "float64", "sigma")
    assert cfg.model.encoders[0].size == "b" and cfg.model.interpolant.prediction == "velocity"


# ----- forward ---------------------------------------------------------------------------------------
def test_forward_is_minus_the_backbone_at_one_minus_t_and_projects_block_k_tokens():
    net = randomize(tiny_net()).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    out = net(x, t, y)
    torch.testing.assert_close(out, -DiT.forward(net, x, 1 - t, y), rtol=0, atol=0)  # REPA's ε − x at 1 − t
    out_p, projections = net(x, t, y, project=True)
    torch.testing.assert_close(out_p, out, rtol=0, atol=0)
    # the tokens after block 2 (of 3), by hand
    tokens = net.x_embedder(x) + net.pos_embed
    c = net.t_embedder(1 - t) + net.y_embedder(y, False)
    for block in net.blocks[:2]:
        tokens = block(tokens, c)
    assert [p.shape for p in projections] == [(3, 16, 16), (3, 16, 8)]
    for projector, projected in zip(net.projectors, projections, strict=True):
        torch.testing.assert_close(projected, projector(tokens.reshape(-1, 32)).reshape(3, 16, -1))
    # a net aligned after the last block would project other tokens
    late_net = randomize(tiny_net(encoder_depth=3))
    late_net.load_state_dict(net.state_dict())
    assert not torch.allclose(late_net.eval()(x, t, y, project=True)[1][0], projections[0])


def test_visgen_time_convention_runs_the_backbone_as_is():
    net = randomize(tiny_net(time_convention="visgen")).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    torch.testing.assert_close(net(x, t, y), DiT.forward(net, x, t, y), rtol=0, atol=0)


def test_bad_settings_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="learn_sigma"):
        tiny_net(learn_sigma=True)
    with pytest.raises(ValueError, match="encoder_depth=4 must lie in"):
        tiny_net(encoder_depth=4)
    with pytest.raises(ValueError, match="time_convention='sit'"):
        tiny_net(time_convention="sit")


# ----- official files ----------------------------------------------------------------------------------
def labelled_state(layout: dict[str, tuple[int, ...]], offset: float) -> dict[str, torch.Tensor]:
    """One distinct value per key (a stride-0 expansion: tiny on disk), so a swapped key is caught."""
    return {k: torch.full((), offset + i).expand(shape) for i, (k, shape) in enumerate(layout.items())}


@pytest.fixture(scope="module")
def xl_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("repa_official")
    layout = preset_layout("repa_sit_xl_2")
    ema, model = labelled_state(layout, 0.0), labelled_state(layout, 1000.0)
    legacy = {(f"decoder_blocks.{int(k.split('.')[1]) - 8}." + k.split(".", 2)[2]
               if k.startswith("blocks.") and int(k.split(".")[1]) >= 8 else k): v for k, v in ema.items()}
    torch.save(ema, root / "last.pt")
    torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="SiT-XL/2", enc_type="dinov2-vit-b"), "steps": 4_000_000},
               root / "4000000.pt")
    torch.save({"model": legacy, "ema": legacy, "steps": 50_000}, root / "legacy.pt")
    return {"root": root, "ema": ema, "layout": layout}


def assert_holds(net: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Every key holds its own label (the files are constant per key: shape and one value decide)."""
    state = net.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert state[k].shape == v.shape and state[k].reshape(-1)[0] == v.reshape(-1)[0], k


def test_released_raw_state_dict_loads_strictly(xl_files):
    net = load_official("repa_sit_xl_2", xl_files["root"] / "last.pt")
    assert_holds(net, xl_files["ema"])
    assert isinstance(net, REPASiT) and not net.pos_embed.requires_grad


def test_train_script_checkpoint_loads_its_ema(xl_files, caplog):
    caplog.set_level(logging.INFO, logger="visgen.official")
    net = load_official("repa_sit_xl_2", xl_files["root"] / "4000000.pt")
    assert_holds(net, xl_files["ema"])
    assert "'ema' weights" in caplog.text


def test_legacy_decoder_blocks_are_renumbered_after_the_encoder_blocks(xl_files):
    net = load_official("repa_sit_xl_2", xl_files["root"] / "legacy.pt")
    assert_holds(net, xl_files["ema"])
    state = {"blocks.0.w": torch.zeros(1), "blocks.1.w": torch.ones(1), "decoder_blocks.0.w": torch.full((1,), 2.0)}
    assert list(renumber_legacy_blocks(state)) == ["blocks.0.w", "blocks.1.w", "blocks.2.w"]
    with pytest.raises(ValueError, match="no blocks"):
        renumber_legacy_blocks({"decoder_blocks.0.w": torch.zeros(1)})


def test_a_sit_file_is_refused_by_the_repa_preset(tmp_path):
    layout = dict(preset_layout("repa_sit_b_2"))
    layout = {k: v for k, v in layout.items() if not k.startswith("projectors.")}  # SiT-B/2 without projector
    torch.save(labelled_state(layout, 0.0), tmp_path / "sit.pt")
    with pytest.raises(LayoutMismatchError, match=r"missing from the file: projectors\.0\.0\.weight"):
        load_official("repa_sit_b_2", tmp_path / "sit.pt")
