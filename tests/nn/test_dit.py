"""The DiT backbone: exact parameter counts of the paper's presets, the official key layout, adaLN-Zero."""

import json
from pathlib import Path

import pytest
import torch

from visgen.nn.dit import DIT_SIZES, DiT
from visgen.nn.embeddings import sincos_pos_embed_2d

MANIFESTS = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "manifests"


def build_meta(size: str, patch: int, **kwargs) -> DiT:
    with torch.device("meta"):
        return DiT(**DIT_SIZES[size], patch_size=patch, input_size=32, in_channels=4, num_classes=1000,
                   learn_sigma=True, **kwargs)


@pytest.mark.parametrize(
    ("size", "patch", "expected"),
    [("XL", 2, 675_129_632), ("B", 2, 130_512_416), ("S", 2, 32_963_360), ("L", 4, 458_053_760),
     ("B", 8, 130_881_536)],
)
def test_dit_presets_have_the_released_parameter_counts(size, patch, expected):
    net = build_meta(size, patch)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_dit_counts_match_every_size_in_the_reference_index():
    index_path = MANIFESTS / "_index.json"
    if not index_path.exists():
        pytest.skip("shared/reference is not beside this checkout")
    index = json.loads(index_path.read_text())
    checked = 0
    for name, entry in index.items():
        if not name.startswith("DiT/") or "512" in name:
            continue
        size, patch = entry["model"].removeprefix("DiT-").split("-")
        net = build_meta(size, int(patch))
        assert sum(p.numel() for p in net.parameters()) == entry["n_params"], name
        assert sum(p.numel() for p in net.parameters() if not p.requires_grad) == entry["n_frozen_params"], name
        checked += 1
    assert checked == 12


def test_dit_state_dict_layout_equals_the_official_manifest():
    manifest_path = MANIFESTS / "DiT_DiT-B-2.json"
    if not manifest_path.exists():
        pytest.skip("shared/reference is not beside this checkout")
    manifest = json.loads(manifest_path.read_text())
    state = build_meta("B", 2).state_dict()
    assert set(state) == set(manifest)
    assert all(list(state[k].shape) == manifest[k] for k in manifest)


def test_pos_embed_is_a_frozen_parameter_holding_the_sincos_table():
    net = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    assert isinstance(net.pos_embed, torch.nn.Parameter) and not net.pos_embed.requires_grad
    table = sincos_pos_embed_2d(32, 4)  # (16, 32)
    torch.testing.assert_close(net.pos_embed[0], table)
    # token 1 is column 1 of row 0: its first (w) half differs from token 0, its second (h) half does not
    assert not torch.allclose(table[1, :16], table[0, :16]) and torch.allclose(table[1, 16:], table[0, 16:])


def test_adaln_zero_blocks_are_the_identity_and_the_output_is_zero_at_init():
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    tokens = torch.randn(4, 16, 32)
    cond = torch.randn(4, 32)
    for block in net.blocks:
        torch.testing.assert_close(block(tokens, cond), tokens, rtol=0, atol=0)
    x = torch.randn(4, 3, 8, 8)
    out = net(x, torch.rand(4), torch.randint(0, 10, (4,)))
    assert out.shape == (4, 6, 8, 8)
    assert torch.count_nonzero(out) == 0


def test_unconditional_net_has_no_label_table_and_ignores_labels():
    net = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=0,
              learn_sigma=False)
    assert net.y_embedder is None
    for p in net.final_layer.parameters():
        torch.nn.init.normal_(p)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    torch.testing.assert_close(net(x, t, torch.tensor([0, 1])), net(x, t, torch.tensor([5, 7])))


def test_unpatchify_inverts_the_patch_layout():
    net = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=0,
              learn_sigma=False)
    image = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    # (B, L, p*p*C) in the official (p, q, c) order
    tokens = image.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    torch.testing.assert_close(net.unpatchify(tokens), image)


def test_label_table_init_std_is_dits_by_default_and_configurable():
    """DiT initialises the class table with std 0.02; short demo runs ask for 1.0 (demo_sit.yaml)."""
    torch.manual_seed(0)
    default = DiT(input_size=32, patch_size=4, in_channels=3, hidden_size=128, depth=1, num_heads=4, num_classes=1000)
    wide = DiT(input_size=32, patch_size=4, in_channels=3, hidden_size=128, depth=1, num_heads=4, num_classes=1000,
               label_init_std=1.0)
    assert default.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert wide.y_embedder.embedding_table.weight.std().item() == pytest.approx(1.0, rel=0.02)


def test_a_float64_net_runs_and_agrees_with_float32():
    """The timestep MLP runs in the net's dtype: a .double() net failed with a dtype mismatch."""
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    for p in net.parameters():
        p.data.normal_(0, 0.05)  # leave adaLN-Zero's zero output
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 3])
    out32 = net(x, t, y)
    out64 = net.double()(x.double(), t.double(), y)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-5)
