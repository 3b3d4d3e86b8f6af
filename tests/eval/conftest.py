"""Fixtures of the evaluation tests: randomly initialised feature-extractor weights in the official formats."""

from pathlib import Path

import pytest

from tests.eval.fakes import write_random_inception_weights


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception state-dict layout with random (calibrated) weights; any sha256."""
    return write_random_inception_weights(tmp_path_factory.mktemp("weights") / "inception-random.pth")
