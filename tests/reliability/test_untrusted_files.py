"""A file a stranger sends runs no code: checkpoints' configs build only visgen classes of the right kind, and a
file that is not a checkpoint is one clear error on every entry point (evaluate, autoguidance, resume,
init_from, convert), never advice to load it with weights_only=False."""

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.reliability.crafted import payload, write_checkpoint
from tests.tiny_run import CONF_DIR, compose_train
from visgen.untrusted import UnsafeConfigError, UntrustedFileError, check_targets

TINY_NET = ["model.net.hidden_size=32", "model.net.depth=2", "model.net.num_heads=2"]


def compose_eval(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def _set(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config[key]
    config[last] = value


@pytest.mark.parametrize("place", ["model.net", "model.tokenizer", "sampling", "sampling.interpolant"])
def test_evaluate_refuses_a_checkpoint_whose_config_names_code_outside_visgen(tmp_path, digits_dir, place):
    from visgen.eval.evaluate import evaluate

    pwned = tmp_path / "site-packages" / "evil.pth"
    pwned.parent.mkdir()
    ckpt = write_checkpoint(tmp_path / "crafted.ckpt", digits_dir, lambda c: _set(c, place, payload(pwned)))
    with pytest.raises(UnsafeConfigError, match=rf"crafted.ckpt.*{place}._target_='numpy.savetxt'"):
        evaluate(compose_eval(f"ckpt={ckpt}", "num_samples=2", f"out_dir={tmp_path / 'eval'}"))
    assert not pwned.exists()


def test_a_guide_checkpoint_goes_through_the_same_check(tmp_path, digits_dir):
    from visgen.eval.evaluate import evaluate

    pwned = tmp_path / "evil.pth"
    good = write_checkpoint(tmp_path / "good.ckpt", digits_dir)
    guide = write_checkpoint(tmp_path / "guide.ckpt", digits_dir, lambda c: _set(c, "model.net", payload(pwned)))
    with pytest.raises(UnsafeConfigError, match=r"guide_ckpt=.*guide.ckpt.*numpy.savetxt"):
        evaluate(compose_eval(f"ckpt={good}", f"guide_ckpt={guide}", "num_samples=2", f"out_dir={tmp_path / 'e'}"))
    assert not pwned.exists()


@pytest.mark.parametrize(("node", "message"), [
    ({"_target_": "visgen.sampling.save_grid", "images_uint8": None, "path": "x"}, "not a class"),
    ({"_target_": "visgen.training.run.subprocess.Popen", "args": ["touch", "x"]}, "not a class defined in visgen"),
    ({"_target_": "visgen.nn.dit.DiT", "_partial_": True}, "_partial_"),
    ({"_target_": "visgen.nn.dit.DiT", "depth": "${oc.env:HOME}"}, "interpolation"),
    ({"_target_": "visgen.diffusion.samplers.ODESampler"}, "not a Module subclass"),
    ({"_target_": "visgen.nn.dit.DiT", "extra": {"_target_": "visgen.sampling.Sampler"}}, None),
    ({"_target_": "visgen.nn.dit.DiT", "extra": [{"_target_": "builtins.exec", "source": "1"}]}, "builtins.exec"),
    ({"_target_": "visgen.nn.dit.DiTNope"}, "does not exist"),
])
def test_only_visgen_classes_of_the_expected_kind_pass(node, message):
    if message is None:  # a nested visgen component (here a sampler base) inside a net is allowed
        check_targets(OmegaConf.create(node), "net", "crafted.ckpt", "model.net")
        return
    with pytest.raises(UnsafeConfigError, match=message):
        check_targets(OmegaConf.create(node), "net", "crafted.ckpt", "model.net")


def test_init_from_and_convert_read_only_the_weights_of_a_crafted_checkpoint(tmp_path, digits_dir):
    from visgen.convert import convert
    from visgen.official import init_net_from

    pwned = tmp_path / "evil.pth"
    ckpt = write_checkpoint(tmp_path / "crafted.ckpt", digits_dir, lambda c: _set(c, "model.net", payload(pwned)))
    cfg = compose_train(tmp_path / "run", digits_dir)
    net, ema = instantiate(cfg.model.net), instantiate(cfg.model.net)
    init_net_from(net, ema, ckpt)
    assert torch.equal(net.final_layer.linear.weight, torch.load(ckpt, weights_only=True)["state_dict"][
        "net.final_layer.linear.weight"])
    assert convert("demo_sit", ckpt, tmp_path / "out.safetensors", overrides=TINY_NET) > 0
    assert not pwned.exists()


def _not_checkpoints(tmp_path: Path) -> dict[str, Path]:
    files = {"random bytes": os.urandom(4096), "a yaml file": b"model:\n  net: {depth: 2}\n"}
    paths = {name: tmp_path / f"{name.replace(' ', '_')}.ckpt" for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    torch.save({"state": 1, "f": os.system}, tmp_path / "pickled_code.ckpt")  # a pickle that would run code
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "official_weights.pt")  # a valid file, but no checkpoint
    paths["a pickle naming os.system"] = tmp_path / "pickled_code.ckpt"
    paths["a torch file without visgen metadata"] = tmp_path / "official_weights.pt"
    return paths


def test_a_file_that_is_not_a_checkpoint_is_one_clear_error_on_every_entry_point(tmp_path, digits_dir):
    from visgen.eval.evaluate import evaluate
    from visgen.official import read_checkpoint
    from visgen.training.train import train

    for name, path in _not_checkpoints(tmp_path).items():
        entry_points = {
            "ckpt=": lambda p: evaluate(compose_eval(f"ckpt={p}", f"out_dir={tmp_path / 'eval'}")),
            "ckpt_path=": lambda p: train(compose_train(tmp_path / "run", digits_dir, f"ckpt_path={p}")),
        }
        if "metadata" not in name:  # official weights are fine for init_from / convert
            entry_points["model.init_from="] = read_checkpoint
        for what, entry in entry_points.items():
            with pytest.raises(UntrustedFileError) as caught:
                entry(path)
            message = str(caught.value)
            assert str(path) in message and "weights_only=False" not in message, (name, what, message)
            assert "\n" not in message, (name, what, message)
    assert not (tmp_path / "run" / "run.json").exists()
