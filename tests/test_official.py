"""Official DiT/SiT weights: the presets' exact layouts, strict loading, refusals, conversion, init_from."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from visgen.convert import main as convert_main
from visgen.nn.dit import DIT_SIZES
from visgen.official import (
    LayoutMismatchError,
    _build_on_meta,
    compose_experiment,
    init_net_from,
    load_official,
    preset_layout,
)

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "manifests"
needs_manifests = pytest.mark.skipif(
    not (MANIFESTS / "_index.json").is_file(),
    reason=f"reference manifests not found at {MANIFESTS} (shared/reference/manifests beside the checkout)",
)

DIT_PRESETS = [f"dit_{s}_{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)] + ["dit_xl_2_512"]
SIT_PRESETS = [f"sit_{s}_2" for s in ("s", "b", "l", "xl")]
#: Presets with a released file, and the manifest (key -> shape) of that file.
MANIFEST_OF = {
    "dit_xl_2": "DiT_DiT-XL-2.json",
    "dit_xl_2_512": "DiT_DiT-XL-2-512.json",
    "dit_b_2": "DiT_DiT-B-2.json",
    "sit_xl_2": "SiT_SiT-XL-2.json",
}


def index_name(experiment: str) -> str:
    """dit_xl_2_512 -> 'DiT/DiT-XL-2-512', sit_b_2 -> 'SiT/SiT-B-2': the _index.json entry of a preset."""
    family, size, patch, *res = experiment.split("_")
    repo = {"dit": "DiT", "sit": "SiT"}[family]
    return f"{repo}/{repo}-{size.upper()}-{patch}" + "".join(f"-{r}" for r in res)


@functools.cache
def cfg_of(experiment: str):
    """The composed config of a preset (cached: composing costs ~0.1 s)."""
    return compose_experiment(experiment)


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    """A manifest file as key -> shape."""
    return {k: tuple(v) for k, v in json.loads((MANIFESTS / name).read_text()).items()}


# ----- presets ------------------------------------------------------------------------------------
@needs_manifests
@pytest.mark.parametrize(("experiment", "manifest"), sorted(MANIFEST_OF.items()))
def test_preset_net_has_exactly_the_released_files_keys_and_shapes(experiment, manifest):
    assert preset_layout(experiment) == read_manifest(manifest)


@needs_manifests
@pytest.mark.parametrize("experiment", DIT_PRESETS + SIT_PRESETS)
def test_preset_parameter_counts_equal_the_reference_index(experiment):
    entry = json.loads((MANIFESTS / "_index.json").read_text())[index_name(experiment)]
    net = _build_on_meta(cfg_of(experiment))
    assert sum(p.numel() for p in net.parameters()) == entry["n_params"]
    assert sum(p.numel() for p in net.parameters() if not p.requires_grad) == entry["n_frozen_params"]
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == entry["frozen_param_keys"]
    assert len(net.state_dict()) == entry["n_state_dict_keys"]


@pytest.mark.parametrize("experiment", DIT_PRESETS + SIT_PRESETS)
def test_preset_carries_the_papers_recipe(experiment):
    cfg = cfg_of(experiment)
    size = experiment.split("_")[1].upper()
    net = cfg.model.net
    assert {k: net[k] for k in ("depth", "hidden_size", "num_heads")} == DIT_SIZES[size]
    assert net.patch_size == int(experiment.split("_")[2])
    assert (net.in_channels, net.learn_sigma, net.class_dropout_prob) == (4, True, 0.1)
    assert net.input_size == cfg.data.image_size // 8 == (64 if experiment.endswith("512") else 32)
    assert cfg.data.batch_global == 256 and cfg.data.num_classes == 1000
    opt = cfg.model.optimizer
    assert (opt.lr, opt.weight_decay, opt.warmup_steps, opt.schedule) == (1e-4, 0.0, 0, "constant")
    assert cfg.model.ema_decay == 0.9999
    assert cfg.trainer.gradient_clip_val is None and cfg.trainer.precision == "bf16-mixed"
    assert (cfg.sampling.num_steps, cfg.sampling.cfg_scale, cfg.sampling.guided_channels) == (250, 1.5, 3)
    assert cfg.model.tokenizer.scale == 0.18215  # SD-VAE latents


# ----- strict loading of a B/2-sized file with real values ---------------------------------------
@pytest.fixture(scope="module")
def b2_files(tmp_path_factory) -> dict:
    """DiT-B/2-shaped random weights saved as a raw state dict and as an official training checkpoint."""
    if not (MANIFESTS / "DiT_DiT-B-2.json").is_file():
        pytest.skip(f"reference manifests not found at {MANIFESTS}")
    root = tmp_path_factory.mktemp("official")
    generator = torch.Generator().manual_seed(0)
    ema = {k: torch.randn(shape, generator=generator) for k, shape in read_manifest("DiT_DiT-B-2.json").items()}
    # Raw weights differ from the EMA everywhere; each is one stored value expanded (cheap on disk).
    model = {k: torch.full((), 1.0 + i).expand(v.shape) for i, (k, v) in enumerate(ema.items())}
    torch.save(ema, root / "DiT-B-2-raw.pt")
    torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]},
                "args": argparse.Namespace(model="DiT-B/2", image_size=256, global_batch_size=256)},
               root / "0400000.pt")
    return {"ema": ema, "raw": root / "DiT-B-2-raw.pt", "train": root / "0400000.pt", "root": root}


def assert_holds(net: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor sits in the net under its key; pos_embed frozen, the rest trainable."""
    state = net.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert not net.pos_embed.requires_grad and isinstance(net.pos_embed, torch.nn.Parameter)
    assert all(p.requires_grad for n, p in net.named_parameters() if n != "pos_embed")
    assert not any(t.is_meta for t in net.state_dict().values())


def test_raw_released_state_dict_loads_strictly_with_every_tensor_in_place(b2_files):
    net = load_official("dit_b_2", b2_files["raw"])
    assert_holds(net, b2_files["ema"])
    assert not net.training


def test_training_script_checkpoint_loads_its_ema_weights(b2_files, caplog):
    caplog.set_level(logging.INFO, logger="visgen.official")
    net = load_official("dit_b_2", b2_files["train"])
    assert_holds(net, b2_files["ema"])
    assert "'ema' weights" in caplog.text


def test_a_b2_file_loaded_as_xl2_is_refused_naming_keys_and_the_matching_preset(b2_files):
    with pytest.raises(LayoutMismatchError) as info:
        load_official("dit_xl_2", b2_files["raw"])
    message = str(info.value)
    assert "experiment=dit_xl_2" in message
    assert "shape mismatch: pos_embed: file (1, 256, 768) vs net (1, 256, 1152)" in message
    assert "missing from the file: blocks.12." in message  # XL has 28 blocks, B 12
    assert "this file matches experiment=dit_b_2" in message and "sit_b_2" in message
    assert message.count("\n  ") <= 6  # at most 5 named keys (+ "... and N more")


def test_convert_writes_safetensors_equal_to_the_net_and_refuses_to_overwrite(b2_files, capsys):
    from safetensors.torch import load_file

    out = b2_files["root"] / "dit_b_2.safetensors"
    cmd = [sys.executable, "-m", "visgen.convert", "--experiment", "dit_b_2", "--src", str(b2_files["raw"]),
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "130,512,416 parameters" in done.stdout
    written = load_file(str(out))
    assert set(written) == set(b2_files["ema"])
    assert all(torch.equal(written[k], v) for k, v in b2_files["ema"].items())
    assert convert_main(cmd[3:]) == 1  # in-process: the refusal comes before any loading
    assert "--overwrite" in capsys.readouterr().err


# ----- small files: prefixes, extra keys, init_from -----------------------------------------------
def small_state(seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the layout of demo_sit's net (1.3M parameters)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) for k, shape in preset_layout("demo_sit").items()}


def test_ddp_and_compile_prefixes_are_stripped(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="visgen.official")
    state = small_state(1)
    torch.save({"module._orig_mod." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    net = load_official("demo_sit", tmp_path / "ddp.pt")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert "module._orig_mod." in caplog.text


def test_safetensors_files_load_strictly(tmp_path):
    from safetensors.torch import save_file

    state = small_state(9)
    save_file(state, str(tmp_path / "net.safetensors"))
    net = load_official("demo_sit", tmp_path / "net.safetensors")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert not net.pos_embed.requires_grad


def test_a_file_with_an_extra_key_is_refused(tmp_path):
    state = small_state(2) | {"extra.weight": torch.ones(3)}
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(LayoutMismatchError, match=r"1 unexpected[\s\S]*unexpected in the file: extra.weight"
                       r"[\s\S]*no preset"):
        load_official("demo_sit", tmp_path / "extra.pt")


def build_demo_net_and_ema() -> tuple[torch.nn.Module, torch.nn.Module]:
    """demo_sit's net and its EMA as the training module holds them (frozen copy)."""
    from visgen.training.ema import make_ema

    net = instantiate(cfg_of("demo_sit").model.net)
    return net, make_ema(net)


def test_init_from_a_visgen_checkpoint_loads_net_and_ema_strictly(tmp_path):
    net_state, ema_state = small_state(3), small_state(4)
    state_dict = {"net." + k: v for k, v in net_state.items()} | {"ema." + k: v for k, v in ema_state.items()}
    checkpoint = {"state_dict": state_dict, "visgen": {"config": {}, "ema_prefix": "ema.", "seed": 0}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    net, ema = build_demo_net_and_ema()
    init_net_from(net, ema, tmp_path / "last.ckpt", "demo_sit")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in net_state.items())
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in ema_state.items())
    assert not net.pos_embed.requires_grad and net.blocks[0].attn.qkv.weight.requires_grad
    assert not any(p.requires_grad for p in ema.parameters())


def test_init_from_a_checkpoint_of_another_net_is_refused(tmp_path):
    state = small_state(5)
    state["pos_embed"] = torch.zeros(1, 256, 128)  # a patch-2 net: 16x16 tokens, not 8x8
    torch.save({"state_dict": {"net." + k: v for k, v in state.items()}, "visgen": {"config": {}}},
               tmp_path / "other.ckpt")
    net, ema = build_demo_net_and_ema()
    with pytest.raises(LayoutMismatchError, match=r"pos_embed: file \(1, 256, 128\) vs net \(1, 64, 128\)") as info:
        init_net_from(net, ema, tmp_path / "other.ckpt", "demo_sit")
    assert "experiment=demo_sit" in str(info.value)


def test_init_from_official_files_gives_model_to_the_net_and_ema_to_the_ema(tmp_path):
    model, ema_state = small_state(6), small_state(7)
    torch.save({"model": model, "ema": ema_state, "opt": {}, "args": argparse.Namespace(epochs=1)},
               tmp_path / "train.pt")
    net, ema = build_demo_net_and_ema()
    init_net_from(net, ema, tmp_path / "train.pt", "demo_sit")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in model.items())
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in ema_state.items())


def test_init_from_a_raw_file_gives_both_copies_without_sharing_memory(tmp_path):
    state = small_state(8)
    torch.save(state, tmp_path / "raw.pt")
    with torch.device("meta"):
        net, ema = build_demo_net_and_ema()
    init_net_from(net, ema, tmp_path / "raw.pt", "demo_sit")
    for k, v in state.items():
        assert torch.equal(net.state_dict()[k], v) and torch.equal(ema.state_dict()[k], v)
        assert net.state_dict()[k].data_ptr() != ema.state_dict()[k].data_ptr()
    assert not net.pos_embed.requires_grad and not any(p.requires_grad for p in ema.parameters())


def test_a_registered_format_renames_keys_and_picks_its_own_ema_entry(tmp_path, caplog, monkeypatch):
    """A family registers its format beside its net class: its key map and EMA entry are used, for subclasses
    too, while other nets keep the default; init_from gives the raw entry to the net and the EMA entry to the EMA."""
    from visgen import official
    from visgen.official import OfficialFormat, official_format, register_official

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(2, 3)

    class TinySub(Tiny):
        pass

    monkeypatch.setattr(official, "_FORMATS", {})
    fmt = OfficialFormat(key_map=lambda s: {k.replace("fc.", "proj."): v for k, v in s.items()},
                         ema_entries=("model_ema",), raw_entries=("model",))
    register_official(Tiny, fmt)
    assert official_format(TinySub()) is fmt and official_format(torch.nn.Linear(1, 1)) is official.DEFAULT_FORMAT
    raw = {"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(3)}
    ema = {"fc.weight": torch.ones(3, 2), "fc.bias": torch.ones(3)}
    torch.save({"model": raw, "model_ema": ema}, tmp_path / "ckpt.pth")
    state, source = official.official_state_dict(official.read_checkpoint(tmp_path / "ckpt.pth"), "f", fmt)
    assert "'model_ema'" in source and torch.equal(state["fc.weight"], ema["fc.weight"])
    with pytest.raises(ValueError, match="'ema/model'"):  # the default format does not know 'model_ema'
        official.official_state_dict({"model_ema": ema}, "f")
    net, ema_net = TinySub(), TinySub()
    init_net_from(net, ema_net, tmp_path / "ckpt.pth")
    assert torch.equal(net.proj.weight, raw["fc.weight"]) and torch.equal(ema_net.proj.weight, ema["fc.weight"])
