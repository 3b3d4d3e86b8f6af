"""MAR's KL-16: the release converts strictly into diffusers' AutoencoderKL and loads as the mar_kl16 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visgen.paradigms.mar_kl16 import SCALE, load_kl16, main
from visgen.tokenizers.ldm_keys import UnmappedKeysError

MANIFESTS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "manifests"
pytestmark = pytest.mark.skipif(not (MANIFESTS / "mar_kl16_vae.json").is_file(),
                                reason=f"reference manifests not found at {MANIFESTS}")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A kl16.ckpt-shaped file: {"model": LDM-named tensors}, one distinct stored value per tensor."""
    shapes = json.loads((MANIFESTS / "mar_kl16_vae.json").read_text())
    state = {k: torch.full((), 0.001 * i).expand(s) for i, (k, s) in enumerate(shapes.items())}
    path = tmp_path_factory.mktemp("kl16") / "kl16.ckpt"
    torch.save({"model": state}, path)
    return path, state


def test_release_converts_strictly_with_the_official_count(release) -> None:
    path, state = release
    vae = load_kl16(path)
    assert sum(p.numel() for p in vae.parameters()) == 66_456_019
    got = vae.state_dict()
    assert torch.equal(got["decoder.conv_out.weight"], state["decoder.conv_out.weight"])
    assert torch.equal(got["encoder.down_blocks.4.attentions.0.to_q.weight"],
                       state["encoder.down.4.attn.0.q.weight"].reshape(512, 512))


def test_an_unknown_key_is_refused_unless_ignored_by_name(release, tmp_path: Path) -> None:
    _, state = release
    # (a missing key is load_strict's LayoutMismatchError, tested with every family in tests/test_official.py)
    torch.save({"model": {**state, "loss.logvar": torch.zeros(())}}, tmp_path / "extra.ckpt")
    with pytest.raises(UnmappedKeysError, match="loss.logvar"):
        load_kl16(tmp_path / "extra.ckpt")
    assert sum(p.numel() for p in load_kl16(tmp_path / "extra.ckpt", ignore=("loss.",)).parameters()) == 66_456_019


def test_converted_directory_is_the_mar_kl16_tokenizer(release, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from visgen.official import CONF_DIR
    from visgen.tokenizers import SDVAETokenizer

    cfg = OmegaConf.load(CONF_DIR / "model" / "tokenizer" / "mar_kl16.yaml")
    assert cfg.scale == SCALE == 0.2325
    assert main(["--src", str(release[0]), "--out", str(tmp_path / "mar-kl16")]) == 0
    tok = SDVAETokenizer(pretrained=str(tmp_path / "mar-kl16"), scale=cfg.scale)
    assert tok.latent_shape(256) == (16, 16, 16)
    assert tok.id == "mar-kl16@0.2325"
    assert torch.equal(tok.vae.state_dict()["decoder.conv_in.bias"], release[1]["decoder.conv_in.bias"])
