"""RoPE tables: LlamaGen's 2-D layout against a direct float64 computation, the zeroed class prefix."""

import math

import pytest
import torch

from visgen.nn.rope import RoPE, apply_rope, rope_table_1d, rope_table_2d


def direct_angle(row: int, col: int, pair: int, head_dim: int, base: float = 10000.0) -> float:
    """Angle of channel pair `pair` at grid cell (row, col): rows for the first head_dim/4 pairs, then columns."""
    quarter = head_dim // 4
    coord, j = (row, pair) if pair < quarter else (col, pair - quarter)
    return coord * base ** (-2 * j / (head_dim // 2))


@pytest.mark.parametrize(("grid", "head_dim"), [(16, 64), (24, 100), (3, 8)])
def test_2d_table_rows_then_columns_after_a_zero_class_row(grid, head_dim):
    table = rope_table_2d(grid, head_dim, prefix_len=1)
    assert table.shape == (1 + grid * grid, head_dim // 2, 2) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(head_dim // 2, 2))  # class token: cos = sin = 0
    expected = torch.tensor([[direct_angle(p // grid, p % grid, j, head_dim) for j in range(head_dim // 2)]
                             for p in range(grid * grid)], dtype=torch.float64)  # raster order
    torch.testing.assert_close(table[1:, :, 0].double(), expected.cos(), atol=2e-6, rtol=0)
    torch.testing.assert_close(table[1:, :, 1].double(), expected.sin(), atol=2e-6, rtol=0)


def test_a_column_major_table_is_not_what_llamagen_builds():
    # The broken variant: (column, row) instead of (row, column) differs off the diagonal.
    grid, head_dim = 4, 8
    table = rope_table_2d(grid, head_dim)
    swapped = torch.tensor([[direct_angle(p % grid, p // grid, j, head_dim) for j in range(head_dim // 2)]
                            for p in range(grid * grid)], dtype=torch.float64)
    assert (table[1:, :, 0].double() - swapped.cos()).abs().max() > 0.1


def test_apply_rope_rotates_interleaved_pairs_like_complex_multiplication():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=generator)  # (B, L, H, Dh)
    table = rope_table_1d(5, 8)
    rotated = apply_rope(x, table)
    as_complex = torch.view_as_complex(x.double().reshape(2, 5, 3, 4, 2).contiguous())  # pairs (2i, 2i+1)
    angles = torch.arange(5, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2) / 8)  # (L, 4)
    expected = torch.view_as_real(as_complex * torch.polar(torch.ones_like(angles), angles)[None, :, None])
    torch.testing.assert_close(rotated.double(), expected.reshape(2, 5, 3, 8), atol=1e-5, rtol=0)


def test_the_class_prefix_queries_and_keys_are_zeroed_not_left_unrotated():
    x = torch.randn(1, 3, 2, 8)
    out = apply_rope(x, rope_table_2d(grid_size=1, head_dim=8, prefix_len=2))  # 2 prefix rows + 1 token
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    assert not torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))


def test_rope_module_table_is_real_on_meta_nets_and_stays_fp32_under_dtype_casts():
    with torch.device("meta"):
        rope = RoPE.grid_2d(4, 16)
    assert rope.table.device.type == "cpu"  # built on the CPU: nothing to restore after loading on meta
    exact = rope.table.clone()
    rope.to(torch.bfloat16)
    assert rope.table.dtype == torch.float32 and torch.equal(rope.table, exact)
    assert "table" not in rope.state_dict()  # not a weight: never in checkpoints
    assert torch.equal(rope(torch.tensor([0, 5])), exact[[0, 5]])


def test_head_dims_that_cannot_split_into_row_and_column_pairs_are_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_table_2d(4, 6)
    assert math.isclose(direct_angle(0, 3, 4, 16), 3.0)  # column pair 0 at column 3: angle 3 * base^0
