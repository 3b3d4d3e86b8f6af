"""LlamaGen's GPT: exact parameter counts, causal masking, KV-cache logits equal full recomputation."""

import pytest
import torch

from visgen.nn.gpt import GPT, GPT_SIZES
from visgen.nn.llama import RMSNorm, SwiGLU, llama_ffn_hidden

#: LlamaGen README / the reference index: GPT-B .. GPT-3B.
OFFICIAL_COUNTS = {"B": 110_888_448, "L": 342_910_976, "XL": 774_699_520, "XXL": 1_410_972_672,
                   "3B": 3_096_659_200}


def tiny_gpt(dtype=torch.float64, **kwargs) -> GPT:
    """A 2-block GPT over a 4x4 grid of 32 codes, with every weight random (the zero head would hide bugs)."""
    torch.manual_seed(0)
    net = GPT(**{"vocab_size": 32, "grid_size": 4, "hidden_size": 32, "depth": 2, "num_heads": 2,
                 "num_classes": 5, "multiple_of": 16, **kwargs})
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return net.to(dtype).eval()


@pytest.mark.parametrize("size", list(OFFICIAL_COUNTS))
def test_gpt_sizes_have_the_official_parameter_counts(size):
    with torch.device("meta"):
        net = GPT(**GPT_SIZES[size])
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_COUNTS[size]


def test_llama_pieces_match_their_formulas():
    assert llama_ffn_hidden(768) == 2048 and llama_ffn_hidden(3200) == 8704  # 2/3 * 4d rounded up to 256
    x = torch.randn(3, 7, dtype=torch.float64)
    norm = RMSNorm(7, eps=1e-5).double()
    torch.testing.assert_close(norm(x), x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
    ffn = SwiGLU(7, 16).double()
    expected = ffn.w2(torch.nn.functional.silu(ffn.w1(x)) * ffn.w3(x))
    torch.testing.assert_close(ffn(x), expected)
    assert all(m.bias is None for m in ffn.modules() if isinstance(m, torch.nn.Linear))


def test_a_code_never_sees_later_codes_and_a_bidirectional_block_would():
    net = tiny_gpt()
    codes = torch.randint(0, 32, (2, 15))
    labels = torch.tensor([1, 3])
    changed = codes.clone()
    changed[:, 9] = (codes[:, 9] + 1) % 32
    before, after = net(codes, labels), net(changed, labels)  # (2, 16, 32)
    assert torch.equal(before[:, :10], after[:, :10])  # rows 0..9 predict codes 0..9 from codes < 9 (and 9 itself
    assert not torch.allclose(before[:, 10:], after[:, 10:])  # is input to row 10 onwards)
    for block in net.blocks:  # the broken variant: no causal mask
        block.attention.causal = False
    leaky = net(changed, labels)
    assert not torch.allclose(leaky[:, :10], before[:, :10])


def test_kv_cache_logits_equal_full_recomputation():
    net = tiny_gpt()
    labels = torch.tensor([0, 4, 5])  # 5 is the null class
    codes = torch.randint(0, 32, (3, 16))
    full = net(codes[:, :-1], labels)  # (3, 16, 32)
    cache = net.new_cache(3, torch.float64, "cpu")
    assert cache.max_len == 24  # 1 + 16 rounded up to a multiple of 8, as LlamaGen
    steps = [net.prefill(labels, cache)]
    for i in range(1, 16):
        steps.append(net.decode(codes[:, i - 1], torch.tensor([i]), cache))
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-12, rtol=0)
    # A step written at the wrong position reads a different context: the comparison can fail.
    cache = net.new_cache(3, torch.float64, "cpu")
    net.prefill(labels, cache)
    wrong = net.decode(codes[:, 0], torch.tensor([2]), cache)
    assert not torch.allclose(wrong, full[:, 1])


def test_training_mode_drops_labels_and_tokens_eval_mode_is_deterministic():
    net = tiny_gpt(class_dropout_prob=0.5)
    codes, labels = torch.randint(0, 32, (64, 15)), torch.arange(64) % 5
    assert torch.equal(net(codes, labels), net(codes, labels))
    net.train()
    torch.manual_seed(1)
    assert not torch.equal(net(codes, labels), net.eval()(codes, labels))


def test_unconditional_net_has_one_start_row_and_too_long_inputs_are_refused():
    net = GPT(vocab_size=8, grid_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=0, multiple_of=16)
    assert net.cls_embedding.embedding_table.weight.shape == (1, 16)
    assert net(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long)).shape == (2, 4, 8)
    with pytest.raises(ValueError, match="at most 3"):
        net(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long))
