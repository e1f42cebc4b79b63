import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

from keras_muon import MatrixView
from keras_muon.matrix_views import route_by_layer


def built(layer, input_shape):
    layer.build(input_shape)
    return layer


def randomize(variable, seed=0):
    value = np.random.default_rng(seed).normal(size=variable.shape)
    variable.assign(value.astype(variable.dtype))
    return value.astype("float32")


def blocks_of(layer, name, per_head=False):
    """(view, blocks as NumPy) of the layer's variable called `name`."""
    variable = next(v for v in layer.weights if v.name == name)
    route = route_by_layer(layer, variable, per_head)
    assert route.view is not None, route.reason
    blocks = ops.convert_to_numpy(route.view.to_blocks(variable.value))
    back = ops.convert_to_numpy(route.view.from_blocks(ops.convert_to_tensor(blocks)))
    np.testing.assert_array_equal(back, ops.convert_to_numpy(variable.value))
    return route.view, blocks


def test_dense_kernel_is_its_own_matrix():
    layer = built(layers.Dense(7), (None, 5))
    kernel = randomize(layer.kernel)
    view, blocks = blocks_of(layer, "kernel")
    assert (view.num_blocks, view.d_in, view.d_out) == (1, 5, 7)
    np.testing.assert_array_equal(blocks[0], kernel)


@pytest.mark.parametrize("per_head", [False, True])
def test_attention_projections(per_head):
    layer = layers.MultiHeadAttention(num_heads=4, key_dim=3, value_dim=5)
    layer.build((None, 6, 8), (None, 6, 8))
    query = randomize(layer._query_dense.kernel)  # (8, 4, 3)
    output = randomize(layer._output_dense.kernel, seed=1)  # (4, 5, 8)
    view_q, blocks_q = blocks_of(layer._query_dense, "kernel", per_head)
    view_o, blocks_o = blocks_of(layer._output_dense, "kernel", per_head)
    if per_head:
        assert blocks_q.shape == (4, 8, 3) and blocks_o.shape == (4, 5, 8)
        for head in range(4):
            np.testing.assert_array_equal(blocks_q[head], query[:, head, :])
            np.testing.assert_array_equal(blocks_o[head], output[head])
    else:
        np.testing.assert_array_equal(blocks_q[0], query.reshape(8, 12))
        np.testing.assert_array_equal(blocks_o[0], output.reshape(20, 8))


def test_grouped_query_attention_projections():
    layer = layers.GroupQueryAttention(head_dim=4, num_query_heads=6, num_key_value_heads=2)
    layer.build((None, 5, 16), (None, 5, 16))
    key = randomize(layer._key_dense.kernel)  # (16, 2, 4)
    _, blocks = blocks_of(layer._key_dense, "kernel", per_head=True)
    np.testing.assert_array_equal(blocks, key.transpose(1, 0, 2))
    view, _ = blocks_of(layer._output_dense, "kernel")  # (6, 4, 16)
    assert view.matrix_shape == (24, 16)


def test_einsum_dense_reads_the_equation():
    # Kernel axes interleaved (heads, model, head_dim), as in Gemma.
    layer = built(layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 3, 4)), (2, 5, 6))
    kernel = randomize(layer.kernel)  # (3, 6, 4)
    view, blocks = blocks_of(layer, "kernel")
    np.testing.assert_array_equal(blocks[0], kernel.transpose(1, 0, 2).reshape(6, 12))
    x = np.random.default_rng(1).normal(size=(2, 5, 6)).astype("float32")
    y = ops.convert_to_numpy(layer(x)).reshape(2, 5, 12)
    np.testing.assert_allclose(y, x @ blocks[0], atol=1e-5)
    _, per_head = blocks_of(layer, "kernel", per_head=True)
    np.testing.assert_array_equal(per_head, kernel)


def test_einsum_dense_shared_axes_index_blocks():
    # One matrix per expert: e appears in the input, kernel and output.
    layer = built(layers.EinsumDense("ebd,edf->ebf", output_shape=(4, 7)), (3, 4, 5))
    kernel = randomize(layer.kernel)  # (3, 5, 7)
    view, blocks = blocks_of(layer, "kernel")
    assert (view.num_blocks, view.d_in, view.d_out) == (3, 5, 7)
    np.testing.assert_array_equal(blocks, kernel)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_kernel_blocks_are_groups(groups):
    layer = built(layers.Conv2D(8, (3, 2), groups=groups), (None, 9, 9, 4))
    kernel = randomize(layer.kernel)  # (3, 2, 4/groups, 8)
    view, blocks = blocks_of(layer, "kernel")
    c_in, c_out = 4 // groups, 8 // groups
    assert blocks.shape == (groups, 6 * c_in, c_out)
    for g in range(groups):
        expected = kernel[..., g * c_out : (g + 1) * c_out].reshape(6 * c_in, c_out)
        np.testing.assert_array_equal(blocks[g], expected)


def test_grouped_pointwise_conv_multiplies_each_group_by_its_block():
    layer = built(layers.Conv1D(6, 1, groups=2, use_bias=False), (None, 1, 4))
    randomize(layer.kernel)
    _, blocks = blocks_of(layer, "kernel")
    x = np.random.default_rng(2).normal(size=(3, 1, 4)).astype("float32")
    y = ops.convert_to_numpy(layer(x))[:, 0]
    np.testing.assert_allclose(y[:, :3], x[:, 0, :2] @ blocks[0], atol=1e-5)
    np.testing.assert_allclose(y[:, 3:], x[:, 0, 2:] @ blocks[1], atol=1e-5)


def test_transposed_conv_reads_input_channels():
    layer = built(layers.Conv2DTranspose(5, (2, 3)), (None, 4, 4, 7))
    kernel = randomize(layer.kernel)  # (2, 3, 5, 7)
    view, blocks = blocks_of(layer, "kernel")
    assert view.matrix_shape == (7, 30)
    np.testing.assert_array_equal(blocks[0], kernel.reshape(30, 7).T)


def test_separable_conv_pointwise_kernel():
    layer = built(layers.SeparableConv2D(6, 3, depth_multiplier=2), (None, 8, 8, 3))
    view, _ = blocks_of(layer, "pointwise_kernel")
    assert view.matrix_shape == (6, 6)
    depthwise = next(v for v in layer.weights if v.name == "depthwise_kernel")
    assert route_by_layer(layer, depthwise, False).view is None


@pytest.mark.parametrize(
    "layer, gates", [(layers.LSTM(5), 4), (layers.GRU(5), 3), (layers.SimpleRNN(5), 1)]
)
def test_recurrent_kernels_are_one_block_per_gate(layer, gates):
    layer.build((None, 2, 7))
    cell = layer.cell
    kernel = randomize(cell.kernel)
    recurrent = randomize(cell.recurrent_kernel, seed=1)
    view, blocks = blocks_of(cell, "kernel")
    assert blocks.shape == (gates, 7, 5)
    _, recurrent_blocks = blocks_of(cell, "recurrent_kernel")
    for g in range(gates):
        np.testing.assert_array_equal(blocks[g], kernel[:, g * 5 : (g + 1) * 5])
        np.testing.assert_array_equal(recurrent_blocks[g], recurrent[:, g * 5 : (g + 1) * 5])
    assert route_by_layer(cell, cell.bias, False).view is None


def test_conv_lstm_kernels_are_one_conv_matrix_per_gate():
    layer = layers.ConvLSTM2D(5, 3)
    layer.build((None, 2, 8, 8, 3))
    kernel = randomize(layer.cell.kernel)  # (3, 3, 3, 20)
    _, blocks = blocks_of(layer.cell, "kernel")
    assert blocks.shape == (4, 27, 5)
    for g in range(4):
        np.testing.assert_array_equal(blocks[g], kernel[..., g * 5 : (g + 1) * 5].reshape(27, 5))
    view, _ = blocks_of(layer.cell, "recurrent_kernel")
    assert (view.num_blocks, view.d_in, view.d_out) == (4, 45, 5)


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
