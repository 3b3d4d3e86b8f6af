"""A hub tokenizer when the hub is unreachable: one quick try, then the local cache only or a clear error naming the
fix, never minutes of retries (nothing here reaches the network: reachability is stubbed)."""

import os

import pytest

from tests.tiny_run import compose_train
from visgen.training import preflight


@pytest.fixture
def sd_vae_run(tmp_path, digits_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online as far as the environment says
    monkeypatch.setattr(preflight, "_hub_reachable", lambda: False)
    return compose_train(tmp_path / "run", digits_dir, "model/tokenizer=sd_vae_ema")


def test_a_cached_hub_tokenizer_loads_offline_when_the_hub_cannot_be_reached(sd_vae_run, monkeypatch):
    monkeypatch.setattr(preflight, "_in_hub_cache", lambda repo, subfolder: repo == "stabilityai/sd-vae-ft-ema")
    assert preflight.missing_inputs(sd_vae_run) == []
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the loader then reads the cache without asking the hub


def test_an_uncached_hub_tokenizer_with_the_hub_unreachable_is_named_with_the_fix(sd_vae_run, monkeypatch):
    monkeypatch.setattr(preflight, "_in_hub_cache", lambda repo, subfolder: False)
    problems = preflight.missing_inputs(sd_vae_run)
    assert problems == ["model.tokenizer.pretrained: stabilityai/sd-vae-ft-ema is not in the local Hugging Face cache "
                        "and huggingface.co cannot be reached; download it where there is internet (`hf download "
                        "stabilityai/sd-vae-ft-ema --local-dir <dir>`) and set model.tokenizer.pretrained=<dir>"]
    assert "HF_HUB_OFFLINE" not in os.environ
