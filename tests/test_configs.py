"""The Hydra tree: every experiment composes, its net builds alone on the meta device, bad keys fail."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_there_are_experiments_and_a_demo():
    assert "demo_sit" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_its_net_builds_on_meta(experiment):
    cfg = compose_train(f"experiment={experiment}")
    if "num_classes" in cfg.model.net:  # generators; tokenizer nets (experiment=vq_f16, ...) are unconditional
        assert cfg.model.net.num_classes == cfg.data.num_classes
    with torch.device("meta"):
        net = instantiate(cfg.model.net)
    assert isinstance(net, torch.nn.Module)
    assert sum(p.numel() for p in net.parameters()) > 0
    # Evaluation rebuilds these from the checkpoint's (resolved) config only if they pass visgen.untrusted's
    # check: visgen classes, samplers subclassing visgen.sampling.Sampler.
    from visgen.untrusted import check_targets

    for role, node in (("net", cfg.model.net), ("tokenizer", cfg.model.get("tokenizer")), ("sampler", cfg.sampling)):
        if node is None:  # tokenizer training (model=autoencoder) has no tokenizer of its own
            continue
        check_targets(OmegaConf.create(OmegaConf.to_container(node, resolve=True)), role, experiment, role)


def test_demo_sit_net_is_the_small_pixel_sit():
    cfg = compose_train("experiment=demo_sit")
    net = instantiate(cfg.model.net)
    assert sum(p.numel() for p in net.parameters()) == 1_291_824  # the issue's ~1.3M-parameter SiT
    assert (cfg.model.net.patch_size, cfg.model.net.hidden_size, cfg.model.net.depth) == (4, 128, 4)


def test_a_config_key_that_does_not_exist_is_an_error():
    with pytest.raises(ConfigCompositionException, match="batch_globl"):
        compose_train("experiment=demo_sit", "data.batch_globl=64")


def test_num_classes_zero_builds_an_unconditional_net():
    cfg = compose_train("experiment=demo_sit", "data.num_classes=0")
    assert instantiate(cfg.model.net).y_embedder is None


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_gaussian_samplers_use_the_models_own_process(sampler):
    # A model trained on the cosine schedule must not be sampled on the linear one: the sampler reads
    # model.diffusion instead of its own fallback keys.
    cfg = compose_train("experiment=dit_b_2", f"sampling={sampler}", "model.diffusion.beta_schedule=cosine",
                        "model.diffusion.learn_sigma=false")
    built = instantiate(cfg.sampling)
    assert (built.diffusion.beta_schedule, built.diffusion.learn_sigma) == ("cosine", False)
    assert built.diffusion.num_timesteps == cfg.sampling.num_steps  # respaced from the model's 1000 steps
