"""MaskGIT's networks: the v1 MaskTransformer and the Halton-MaskGIT Transformer, their official layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from visgen.nn.halton_maskgit import HALTON_SIZES, HaltonTransformer, halton_key_map
from visgen.nn.maskgit import MASKGIT_V1_SIZES, MaskTransformer, v1_key_map
from visgen.official import LayoutMismatchError, load_strict, official_format

MANIFESTS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "manifests"
needs_manifests = pytest.mark.skipif(not (MANIFESTS / "_index.json").is_file(),
                                     reason=f"reference manifests not found at {MANIFESTS}")


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((MANIFESTS / name).read_text()).items()}


def tagged(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A state dict of the layout whose tensor number i holds the value i everywhere (no memory: expanded)."""
    return {k: torch.full((), float(i)).expand(shape) for i, (k, shape) in enumerate(layout.items())}


def small_v1(**kw) -> MaskTransformer:
    return MaskTransformer(input_size=4, codebook_size=16, num_classes=10, hidden_size=32, depth=2, num_heads=4,
                           mlp_dim=64, **kw)


# ----- parameter counts -----------------------------------------------------------------------------------------
@needs_manifests
@pytest.mark.parametrize(("size", "image_size"), [("base", 256), ("base", 512), ("big", 256), ("huge", 256)])
def test_v1_sizes_have_the_official_parameter_counts(size, image_size):
    index = json.loads((MANIFESTS / "_index.json").read_text())
    entry = index[f"maskgit-pytorch-v1/MaskTransformer-{size}-{image_size}"]
    with torch.device("meta"):
        net = MaskTransformer(input_size=image_size // 16, **MASKGIT_V1_SIZES[size])
    assert sum(p.numel() for p in net.parameters()) == entry["n_params"]  # base 256: 174,160,874
    assert len(net.state_dict()) == entry["n_state_dict_keys"]


@needs_manifests
@pytest.mark.parametrize("size", list(HALTON_SIZES))
def test_halton_sizes_have_the_official_parameter_counts_with_the_head_tied(size):
    entry = json.loads((MANIFESTS / "_index.json").read_text())[f"halton-maskgit/Transformer-{size}-384"]
    with torch.device("meta"):
        net = HaltonTransformer(input_size=24, **HALTON_SIZES[size])
    assert sum(p.numel() for p in net.parameters()) == entry["n_params"]  # the tied head counted once
    assert sum(v.numel() for v in net.state_dict().values()) == entry["state_dict_numel"]  # and stored twice
    assert net.head.weight is net.tok_emb.weight


# ----- v1: the renamed blocks compute what the official modules compute ----------------------------------------
def test_v1_attention_equals_multihead_attention_with_the_packed_official_weights():
    torch.manual_seed(0)
    block = small_v1().blocks[0].eval()
    mha = nn.MultiheadAttention(32, num_heads=4, batch_first=True, bias=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.attn.qkv.weight)
        mha.in_proj_bias.copy_(block.attn.qkv.bias)
        mha.out_proj.weight.copy_(block.attn.proj.weight)
        mha.out_proj.bias.copy_(block.attn.proj.bias)
    x = torch.randn(3, 17, 32)
    assert torch.allclose(block.attn(x), mha(x, x, x)[0], atol=1e-5)


def test_v1_logits_are_features_times_the_shared_table_plus_the_position_bias():
    torch.manual_seed(0)
    net = small_v1().eval()
    with torch.no_grad():
        net.bias.normal_()
    codes, labels = torch.randint(0, 17, (2, 4, 4)), torch.tensor([3, 10])  # 10: the null class
    logits = net(codes, labels)
    tokens = torch.cat([codes.view(2, -1), labels.view(2, 1) + 17], 1)  # classes after the 16 codes and the mask
    x = net.first_layer(net.tok_emb(tokens) + net.pos_emb)
    for block in net.blocks:
        x = block(x)
    x = net.last_layer(x)
    reference = (x @ net.tok_emb.weight.T + net.bias)[:, :16, :17]
    assert logits.shape == (2, 16, 17) and torch.allclose(logits, reference, atol=1e-5)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    net = small_v1(dropout=0.5)
    codes, labels = torch.randint(0, 16, (2, 4, 4)), torch.tensor([1, 2])
    assert not torch.equal(net.train()(codes, labels), net(codes, labels))
    assert torch.equal(net.eval()(codes, labels), net(codes, labels))


def test_a_grid_of_the_wrong_size_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="built for 4x4 codes got a grid of \\(8, 8\\).*model.net.input_size"):
        small_v1()(torch.zeros(1, 8, 8, dtype=torch.long), torch.zeros(1, dtype=torch.long))


# ----- strict loading of manifest-shaped files ------------------------------------------------------------------
@needs_manifests
def test_every_key_of_the_v1_release_lands_in_its_place():
    layout = manifest("maskgit-pytorch-v1_MaskTransformer-base-256.json")
    official = tagged(layout)
    with torch.device("meta"):
        net = MaskTransformer(input_size=16, **MASKGIT_V1_SIZES["base"])
    load_strict(net, official_format(net).key_map(official), "v1 manifest")
    state = net.state_dict()
    value_of = {k: v.flatten()[0].item() for k, v in official.items()}
    renamed = {
        "transformer.layers.7.0.fn.mha.in_proj_weight": "blocks.7.attn.qkv.weight",
        "transformer.layers.7.0.fn.mha.out_proj.bias": "blocks.7.attn.proj.bias",
        "transformer.layers.23.1.norm.weight": "blocks.23.norm2.weight",
        "transformer.layers.0.1.fn.net.3.weight": "blocks.0.mlp.fc2.weight",
        "first_layer.6.weight": "first_layer.6.weight",
        "bias": "bias",
        "pos_emb": "pos_emb",
    }
    for old, new in renamed.items():
        assert state[new].flatten()[0].item() == value_of[old], (old, new)
    assert sorted(v.flatten()[0].item() for v in state.values()) == sorted(value_of.values())  # a bijection


def test_v1_key_map_refuses_an_unknown_block_key_instead_of_dropping_it():
    state = v1_key_map(small_v1().state_dict())  # visgen names pass through unchanged
    with pytest.raises(KeyError, match="transformer.layers.0.0.fn.mha.bias_k"):
        v1_key_map({**state, "transformer.layers.0.0.fn.mha.bias_k": torch.zeros(1)})


def test_a_v1_file_with_an_extra_key_is_refused_where_the_v1_code_loads_non_strictly(monkeypatch):
    monkeypatch.setattr("visgen.official.matching_experiments", lambda *a, **k: [])  # no preset search: fast
    net = small_v1()
    official = {k.replace("blocks.0.attn.qkv.weight", "transformer.layers.0.0.fn.mha.in_proj_weight"): v
                for k, v in net.state_dict().items()}
    load_strict(small_v1(), v1_key_map(official), "fine")
    with pytest.raises(LayoutMismatchError, match="(?s)1 unexpected.*unexpected in the file: extra"):
        load_strict(small_v1(), v1_key_map({**official, "extra": torch.zeros(1)}), "file")


@needs_manifests
def test_the_halton_release_loads_with_its_head_tied_again():
    official = tagged(manifest("halton-maskgit_Transformer-large-384.json"))
    official["head.weight"] = official["tok_emb.weight"]  # stored twice, the same tensor
    with torch.device("meta"):
        net = HaltonTransformer(input_size=24, **HALTON_SIZES["large"])
    load_strict(net, halton_key_map(official), "halton manifest")
    assert net.head.weight is net.tok_emb.weight  # assign=True replaced both; the post-load hook re-tied them
    state = net.state_dict()
    assert state["blocks.23.attn.wq.weight"].flatten()[0] == official["transformer.layers.23.attn.wq.weight"][0, 0]
    assert state["reg_tokens.weight"].flatten()[0] == official["reg_tokens.weight"][0, 0]


def test_a_halton_file_whose_head_differs_from_the_embedding_is_refused():
    net = HaltonTransformer(input_size=4, codebook_size=16, num_classes=10, hidden_size=32, depth=1, num_heads=4)
    state = dict(net.state_dict())
    state["head.weight"] = state["head.weight"] + 1
    with pytest.raises(ValueError, match="head.weight differs from tok_emb.weight"):
        halton_key_map(state)
