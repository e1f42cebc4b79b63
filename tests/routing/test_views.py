"""MatrixView: reading a variable as (d_in, d_out) blocks and back."""

import numpy as np
import pytest
from keras import ops

from keras_muon import MatrixView


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
