"""MatrixView: reading a variable as (d_in, d_out) blocks and back."""

import numpy as np
import pytest
from keras import ops

from keras_muon import MatrixView
from keras_muon.routing.views import PartsView
from keras_muon.routing.views import wide_block


def test_size_one_axes_do_not_transpose():
    view = MatrixView.from_axes((3, 3, 4, 8), inputs=(0, 1, 2), outputs=(3,))
    assert view.perm == (0, 1, 2, 3)
    grouped = MatrixView.from_axes(
        (3, 3, 4, 8), inputs=(0, 1, 2), outputs=(4,), blocks=(3,), split_shape=(3, 3, 4, 1, 8)
    )
    assert grouped.perm == (0, 1, 2, 3, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inputs": (0,), "outputs": (0,)}, "exactly once"),
        ({"inputs": (0, 1), "outputs": ()}, "input and output axes"),
        ({"inputs": (0,), "outputs": (1,), "split_shape": (3, 5)}, "size"),
    ],
)
def test_malformed_views_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MatrixView.from_axes((3, 4), **kwargs)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_wide_blocks_are_the_blocks_with_no_more_rows_than_columns(shape):
    view = MatrixView.dense(shape)
    assert (view.d_in, view.d_out, view.num_blocks) == (*shape, 1)
    x = np.arange(60, dtype="float32").reshape(shape)
    wide = ops.convert_to_numpy(view.to_wide_blocks(ops.convert_to_tensor(x)))
    assert wide.shape == (1, 6, 10) and wide.dtype == np.float32
    np.testing.assert_array_equal(wide[0], x if shape[0] <= shape[1] else x.T)
    back = ops.convert_to_numpy(
        view.from_blocks(view.from_wide_blocks(ops.convert_to_tensor(wide)))
    )
    np.testing.assert_array_equal(back, x)


def test_blocks_round_trip_through_a_permuted_view():
    # (heads, head_dim, d_model) per head: blocks index the first axis.
    view = MatrixView.from_axes((2, 3, 4), inputs=(1,), outputs=(2,), blocks=(0,))
    split = MatrixView.from_axes(
        (5, 8), inputs=(0,), outputs=(2,), blocks=(1,), split_shape=(5, 2, 4)
    )
    for v in (view, split):
        x = np.random.default_rng(0).normal(size=v.shape).astype("float32")
        blocks = v.to_blocks(ops.convert_to_tensor(x))
        assert tuple(blocks.shape) == (v.num_blocks, v.d_in, v.d_out)
        np.testing.assert_array_equal(ops.convert_to_numpy(v.from_blocks(blocks)), x)
    # Column block g of a (5, 8) matrix split in two is x[:, 4g:4g+4].
    x = np.arange(40, dtype="float32").reshape(5, 8)
    blocks = ops.convert_to_numpy(split.to_blocks(ops.convert_to_tensor(x)))
    np.testing.assert_array_equal(blocks[1], x[:, 4:])


def test_parts_view_reads_sections_of_one_axis_and_back():
    # (5, 10) as a (5, 4) section per head (2 heads of 2) and a (5, 6) one.
    heads = MatrixView.from_axes(
        (5, 4), inputs=(0,), outputs=(2,), blocks=(1,), split_shape=(5, 2, 2)
    )
    view = PartsView.of((5, 10), 1, [heads, MatrixView.dense((5, 6))])
    x = np.arange(50, dtype="float32").reshape(5, 10)
    first, second = (ops.convert_to_numpy(b) for b in view.to_blocks(ops.convert_to_tensor(x)))
    np.testing.assert_array_equal(first, np.stack([x[:, 0:2], x[:, 2:4]]))
    np.testing.assert_array_equal(second, x[None, :, 4:])
    back = view.from_blocks(view.to_blocks(ops.convert_to_tensor(x)))
    np.testing.assert_array_equal(ops.convert_to_numpy(back), x)
    assert view.num_blocks == 3 and view.blocks_layout((None, "model")) is None
    # Block 2 counted over the parts is the second part's, wide (6 > 5: as is).
    np.testing.assert_array_equal(ops.convert_to_numpy(wide_block(view, x, 2)), x[:, 4:])
    np.testing.assert_array_equal(ops.convert_to_numpy(wide_block(heads, x[:, :4], 1)), x[:, 2:4].T)


def test_parts_that_do_not_tile_the_variable_are_errors():
    with pytest.raises(ValueError, match="do not add up"):
        PartsView.of((5, 10), 1, [MatrixView.dense((5, 4))])
    with pytest.raises(ValueError, match="no section"):
        PartsView.of((5, 10), 1, [MatrixView.dense((6, 4)), MatrixView.dense((5, 6))])
