"""Fixtures of the evaluation tests: randomly initialised feature-extractor weights in the official formats."""

from pathlib import Path

import pytest

from tests.eval.fakes import write_random_inception_weights
from tests.tiny_run import compose_train


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, digits_dir) -> Path:
    """A tiny SiT trained 8 steps on the built-in digits (tests/tiny_run.py), shared by the evaluate tests."""
    from visgen.training.train import train

    run = tmp_path_factory.mktemp("run")
    train(compose_train(run, digits_dir, "trainer.max_steps=8"))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception state-dict layout with random (calibrated) weights; any sha256."""
    return write_random_inception_weights(tmp_path_factory.mktemp("weights") / "inception-random.pth")
