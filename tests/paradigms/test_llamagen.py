"""LlamaGen presets and official weights: exact counts and layouts, strict loading of manifest-shaped files,
the recipe with its sources, and next-token training that learns."""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

import pytest
import torch

from visgen.nn.gpt import GPT, GPT_SIZES, official_key_map
from visgen.official import LayoutMismatchError, _build_on_meta, compose_experiment, load_official
from visgen.paradigms.llamagen import next_token_loss

MANIFESTS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "manifests"
needs_manifests = pytest.mark.skipif(not (MANIFESTS / "_index.json").is_file(),
                                     reason=f"reference manifests not found at {MANIFESTS}")
PRESETS = {"gpt_b": ("B", 2.0, 256), "gpt_l": ("L", 2.0, 256), "gpt_xl": ("XL", 1.75, 384),
           "gpt_xxl": ("XXL", 1.75, 384), "gpt_3b": ("3B", 1.65, 384)}


@functools.cache
def cfg_of(experiment: str):
    return compose_experiment(experiment)


def index_entry(experiment: str) -> dict:
    size, _, image_size = PRESETS[experiment]
    grid = image_size // 16
    return json.loads((MANIFESTS / "_index.json").read_text())[f"LlamaGen/GPT-{size}-c2i-{grid}x{grid}"]


def manifest(size: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((MANIFESTS / f"LlamaGen_GPT-{size}-c2i-16x16.json").read_text()).items()}


@needs_manifests
@pytest.mark.parametrize("experiment", list(PRESETS))
def test_every_gpt_preset_builds_on_meta_with_the_official_count_and_recipe(experiment):
    cfg = cfg_of(experiment)
    net = _build_on_meta(cfg)
    entry = index_entry(experiment)
    assert sum(p.numel() for p in net.parameters()) == entry["n_params"]
    assert len(net.state_dict()) == entry["n_state_dict_keys"]  # no RoPE table, no cache in the state dict
    assert tuple(net.rope.table.shape) == tuple(entry["freqs_cis_shape"])  # (1 + grid², head_dim / 2, 2)
    size, cfg_scale, image_size = PRESETS[experiment]
    assert {k: cfg.model.net[k] for k in ("depth", "num_heads", "hidden_size")} == GPT_SIZES[size]
    assert (cfg.data.image_size, cfg.model.net.grid_size) == (image_size, image_size // 16)
    opt = cfg.model.optimizer
    assert (opt.lr, tuple(opt.betas), opt.weight_decay, opt.warmup_steps, opt.schedule) == (
        1e-4, (0.9, 0.95), 0.05, 0, "constant")
    assert (cfg.trainer.gradient_clip_val, cfg.trainer.max_epochs, cfg.data.batch_global) == (1.0, 300, 256)
    assert cfg.model.ema_decay == 0.0  # no EMA: the EMA copy equals the raw weights
    assert (cfg.sampling.cfg_scale, cfg.sampling.top_k, cfg.sampling.top_p) == (cfg_scale, 0, 1.0)
    assert cfg.model.tokenizer.key_format.endswith("llamagen_vq_to_diffusers")


@needs_manifests
@pytest.mark.parametrize("size", ["B", "L", "XL"])
def test_the_key_map_turns_each_released_layout_into_the_nets_exactly(size):
    experiment = f"gpt_{size.lower()}"
    net_layout = {k: tuple(v.shape) for k, v in _build_on_meta(cfg_of(experiment)).state_dict().items()}
    official = {k: torch.empty(s, device="meta") for k, s in manifest(size).items()}  # no memory
    mapped = {k: tuple(v.shape) for k, v in official_key_map(official).items()}
    assert mapped == net_layout
    renamed = {k for k in manifest(size) if k.startswith("layers.")}
    assert len(renamed) == 7 * GPT_SIZES[size]["depth"]  # the one difference: layers.N -> blocks.N
    assert set(manifest(size)) - renamed == set(net_layout) - {k for k in net_layout if k.startswith("blocks.")}


@pytest.fixture(scope="module")
def gpt_b_files(tmp_path_factory) -> dict:
    """GPT-B-shaped weights (each tensor one stored value, expanded) as the official scripts save them."""
    if not (MANIFESTS / "LlamaGen_GPT-B-c2i-16x16.json").is_file():
        pytest.skip(f"reference manifests not found at {MANIFESTS}")
    root = tmp_path_factory.mktemp("llamagen")
    weights = {k: torch.full((), 0.5 + i).expand(s) for i, (k, s) in enumerate(manifest("B").items())}
    runtime = {"freqs_cis": torch.zeros(257, 32, 2),  # early files; sample_c2i.py pops it
               "layers.0.attention.kv_cache.k_cache": torch.zeros(1, 12, 264, 64),
               "layers.0.attention.kv_cache.v_cache": torch.zeros(1, 12, 264, 64)}
    torch.save(weights | runtime, root / "c2i_B_fsdp.pt")  # FSDP script: a raw state dict
    torch.save({"model": weights, "optimizer": {"state": {}, "param_groups": []}, "steps": 5000,
                "args": argparse.Namespace(gpt_model="GPT-B", image_size=256)}, root / "0005000.pt")  # DDP script
    return {"weights": weights, "raw": root / "c2i_B_fsdp.pt", "ddp": root / "0005000.pt", "root": root}


def assert_holds(net: GPT, weights: dict) -> None:
    state = net.state_dict()
    assert len(state) == len(weights)
    for key, value in weights.items():
        assert torch.equal(state[key.replace("layers.", "blocks.", 1) if key.startswith("layers.") else key], value)


def test_an_fsdp_state_dict_with_runtime_tensors_loads_strictly_and_names_what_it_dropped(gpt_b_files, caplog):
    caplog.set_level(logging.INFO, logger="visgen.nn.gpt")
    net = load_official("gpt_b", gpt_b_files["raw"])
    assert_holds(net, gpt_b_files["weights"])
    assert "dropped 3 runtime tensors" in caplog.text and "freqs_cis" in caplog.text
    assert net.rope.table.device.type == "cpu" and not net.training


def test_a_ddp_training_checkpoint_loads_its_raw_model_weights(gpt_b_files, caplog):
    caplog.set_level(logging.INFO, logger="visgen.official")
    net = load_official("gpt_b", gpt_b_files["ddp"])
    assert_holds(net, gpt_b_files["weights"])
    assert "raw 'model' weights" in caplog.text


def test_a_gpt_b_file_is_refused_by_gpt_l_naming_the_preset_it_fits(gpt_b_files):
    with pytest.raises(LayoutMismatchError, match=r"blocks.12[\s\S]*this file matches experiment=gpt_b"):
        load_official("gpt_l", gpt_b_files["raw"])


def test_the_key_map_passes_unknown_keys_on_so_strict_loading_refuses_them():
    extra = {"layers.0.attention.bias": torch.zeros(3), "freqs_cis_extra": torch.zeros(1)}
    assert set(official_key_map(extra)) == {"blocks.0.attention.bias", "freqs_cis_extra"}


def test_next_token_training_learns_a_class_dependent_code_pattern():
    torch.manual_seed(0)
    net = GPT(vocab_size=16, grid_size=3, hidden_size=32, depth=2, num_heads=2, num_classes=4, multiple_of=16)
    labels = torch.arange(32) % 4
    codes = (labels[:, None] * 3 + torch.arange(9)[None]) % 16  # code i of class c: (3c + i) mod 16
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = next_token_loss(net, codes.view(32, 3, 3), labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(16.0)).item(), abs=1e-4)  # zero head: uniform
    assert losses[-1] < 0.1 * losses[0]


@pytest.fixture(scope="module")
def demo_vq_file(tmp_path_factory) -> Path:
    """A random-weight tokenizer in demo_vq's layout (8x8 codes of 256 entries), exported as `make demo-vq` does."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.tiny_run import CONF_DIR
    from visgen.tokenizers.vq import save_vq_tokenizer

    torch.manual_seed(0)
    autoencoder = instantiate(OmegaConf.load(CONF_DIR / "model" / "tokenizer" / "layout" / "demo_vq.yaml"))
    return save_vq_tokenizer(autoencoder.eval(), tmp_path_factory.mktemp("vq") / "tokenizer.safetensors", "demo_vq")


def test_demo_preset_trains_end_to_end_and_its_checkpoint_samples_digits(tmp_path, digits_dir, demo_vq_file):
    import csv

    from hydra import compose, initialize_config_dir

    from tests.tiny_run import CONF_DIR, TINY
    from visgen.eval.checkpoint import load_checkpoint, load_net
    from visgen.training.train import train

    keep = [o for o in TINY if not o.startswith(("experiment=", "model.net.", "sampling.", "model.optimizer."))]
    overrides = keep + ["experiment=demo_gpt", "trainer.max_steps=12", "model.net.hidden_size=32", "model.net.depth=1",
                        "model.net.num_heads=2", "model.net.multiple_of=16", "model.optimizer.lr=1e-2",
                        "model.optimizer.warmup_steps=0",
                        f"model.tokenizer.pretrained={demo_vq_file}", f"paths.run_dir={tmp_path}",
                        f"paths.data_dir={digits_dir}", f"paths.cache_dir={digits_dir / 'cache'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.model.net.grid_size == 8 and cfg.model.net.vocab_size == 256 and cfg.sampling.cfg_scale > 1
    train(cfg)
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[0] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.05)  # zero head: uniform codes
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0  # the codes' statistics are learned within 12 steps
    assert (tmp_path / "samples").is_dir() and any((tmp_path / "samples").iterdir())  # the KV-cache sampler ran
    net = load_net(load_checkpoint(tmp_path / "checkpoints" / "last.ckpt"))
    assert isinstance(net, GPT) and net.grid_size == 8
