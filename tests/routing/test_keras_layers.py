"""The routing rules of Keras's layers, and registered rules."""

import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

import keras_muon
from keras_muon.routing.keras_layers import route_by_layer
from tests.helpers import routes
from tests.helpers import table_for


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


def test_convolutional_model():
    images = keras.Input((12, 12, 4))
    x = layers.Conv2D(8, 3, groups=2, name="grouped")(images)
    x = layers.SeparableConv2D(8, 3, name="separable")(x)
    x = layers.DepthwiseConv2D(3, name="depthwise")(x)
    x = layers.Conv2DTranspose(6, 3, name="transposed")(x)
    x = layers.BatchNormalization(name="norm")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.1)(x)
    logits = layers.Dense(3, activation="softmax", name="predictions")(x)
    table = table_for(keras.Model(images, logits), scale="jordan")
    assert routes(table) == {
        "grouped/kernel": "muon",
        "grouped/bias": "adamw",
        "separable/depthwise_kernel": "adamw",
        "separable/pointwise_kernel": "muon",
        "separable/bias": "adamw",
        "depthwise/kernel": "adamw",
        "depthwise/bias": "adamw",
        "transposed/kernel": "muon",
        "transposed/bias": "adamw",
        "norm/gamma": "adamw",
        "norm/beta": "adamw",
        "predictions/kernel": "adamw",
        "predictions/bias": "adamw",
    }
    grouped = table["grouped/kernel"]
    assert (grouped["matrix_shape"], grouped["num_blocks"]) == ((18, 4), 2)
    assert table["transposed/kernel"]["matrix_shape"] == (8, 54)
    assert table["transposed/kernel"]["scale"] == pytest.approx(np.sqrt(54 / 8))
    assert table["norm/gamma"]["reason"] == "normalization (BatchNormalization)"


def test_recurrent_model():
    sequence = keras.Input((7, 5))
    x = layers.LSTM(6, return_sequences=True, name="lstm")(sequence)
    x = layers.GRU(4, name="gru")(x)
    outputs = layers.Dense(2, name="head")(x)
    table = table_for(keras.Model(sequence, outputs))
    lstm = table["lstm/lstm_cell/kernel"]
    assert (lstm["route"], lstm["matrix_shape"], lstm["num_blocks"]) == ("muon", (5, 6), 4)
    recurrent = table["gru/gru_cell/recurrent_kernel"]
    assert (recurrent["matrix_shape"], recurrent["num_blocks"]) == ((4, 4), 3)
    # GRU's bias is 2-D (2, 3·units): still a bias.
    assert table["gru/gru_cell/bias"]["shape"] == (2, 12)
    assert table["gru/gru_cell/bias"]["route"] == "adamw"


@pytest.mark.parametrize("per_head", [False, True])
def test_attention_model(per_head):
    tokens = keras.Input((6,), dtype="int32")
    x = layers.Embedding(20, 16, name="embed")(tokens)
    x = layers.MultiHeadAttention(4, 4, name="mha")(x, x)
    x = layers.GroupQueryAttention(4, 4, 2, name="gqa")(x, x)
    x = layers.LayerNormalization(name="ln")(x)
    logits = layers.Dense(20, name="lm_head")(x)
    table = table_for(keras.Model(tokens, logits), per_head=per_head)
    for path in ["mha/query/kernel", "mha/attention_output/kernel", "gqa/key/kernel"]:
        assert table[path]["route"] == "muon"
    for path in ["mha/query/bias", "gqa/query/bias", "ln/gamma", "lm_head/kernel"]:
        assert table[path]["route"] == "adamw"
    query, output = table["mha/query/kernel"], table["mha/attention_output/kernel"]
    key = table["gqa/key/kernel"]
    if per_head:
        assert (query["matrix_shape"], query["num_blocks"]) == ((16, 4), 4)
        assert (output["matrix_shape"], output["num_blocks"]) == ((4, 16), 4)
        assert (key["matrix_shape"], key["num_blocks"]) == ((16, 4), 2)
    else:
        assert (query["matrix_shape"], query["num_blocks"]) == ((16, 16), 1)
        assert (key["matrix_shape"], key["num_blocks"]) == ((16, 8), 1)


class Mixer(keras.layers.Layer):
    """A layer of a type the optimizer does not know."""

    def __init__(self, kernel_shape, **kwargs):
        super().__init__(**kwargs)
        self.kernel = self.add_weight(shape=kernel_shape, name="kernel")

    def call(self, x):
        return x


class PatchEmbedding(Mixer):
    pass


def test_unknown_layer_types():
    inputs = keras.Input((4,))
    x = Mixer((4, 6), name="flat")(inputs)
    x = Mixer((2, 2, 3), name="cube")(x)
    x = PatchEmbedding((4, 6), name="patches")(x)
    outputs = layers.Dense(2, name="head")(x)
    table = table_for(keras.Model(inputs, outputs))
    assert table["flat/kernel"]["route"] == "muon"
    assert table["flat/kernel"]["reason"] == "unknown layer type Mixer: 2-D kernel as Dense"
    assert table["cube/kernel"]["route"] == "adamw"
    assert table["cube/kernel"]["reason"] == "unknown layer type Mixer"
    assert table["patches/kernel"]["route"] == "adamw"
    assert table["patches/kernel"]["reason"] == "embedding (PatchEmbedding)"


class Projection(keras.layers.Layer):
    """Stores its matrix torch-style, (d_out, d_in)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(6, input_shape[-1]), name="w")
        self.b = self.add_weight(shape=(6,), name="b")

    def call(self, x):
        return x @ ops.transpose(self.w) + self.b


def projection_rule(layer, variable, per_head):
    if variable.name == "w":
        view = keras_muon.MatrixView.from_axes(variable.shape, inputs=(1,), outputs=(0,))
        return keras_muon.Route(view, "Projection weight")
    return keras_muon.Route(None, "Projection bias")


def test_registered_rule(isolated_rules):
    keras_muon.register_layer_rule(Projection, projection_rule)
    inputs = keras.Input((4,))
    outputs = layers.Dense(2, name="head")(Projection(name="proj")(inputs))
    table = table_for(keras.Model(inputs, outputs), scale="jordan")
    assert table["proj/w"]["route"] == "muon"
    assert table["proj/w"]["matrix_shape"] == (4, 6)
    assert table["proj/w"]["scale"] == pytest.approx(np.sqrt(6 / 4))
    assert table["proj/b"]["reason"] == "Projection bias"


def test_registered_rule_overrides_the_embedding_name(isolated_rules):
    keras_muon.register_layer_rule(PatchEmbedding, _dense_mixer_rule)
    inputs = keras.Input((4,))
    outputs = layers.Dense(2, name="head")(PatchEmbedding((4, 6), name="patches")(inputs))
    assert table_for(keras.Model(inputs, outputs))["patches/kernel"]["route"] == "muon"


def _dense_mixer_rule(layer, variable, per_head):
    return keras_muon.Route(keras_muon.MatrixView.from_axes(variable.shape, (0,), (1,)), "mixer")


def test_registered_rule_validates_its_arguments(isolated_rules):
    with pytest.raises(ValueError, match="layer_type"):
        keras_muon.register_layer_rule(object, projection_rule)
    with pytest.raises(ValueError, match="rule"):
        keras_muon.register_layer_rule(Projection, "not a function")


@pytest.mark.parametrize(
    "rule, message",
    [
        (lambda layer, variable, per_head: "muon", "must return a Route"),
        (
            lambda layer, variable, per_head: keras_muon.Route(
                keras_muon.MatrixView.from_axes((3, 5), (0,), (1,)), "wrong shape"
            ),
            "returned a view of shape",
        ),
    ],
)
def test_bad_rule_results_are_errors(isolated_rules, rule, message):
    keras_muon.register_layer_rule(Projection, rule)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, layers.Dense(2)(Projection(name="proj")(inputs)))
    with pytest.raises(ValueError, match=message):
        table_for(model)


def test_spectral_normalization_routes_as_the_wrapped_layer():
    images = keras.Input((8, 8, 3))
    x = layers.SpectralNormalization(layers.Conv2D(4, 3, name="conv"), name="sn_conv")(images)
    x = layers.SpectralNormalization(
        layers.EinsumDense("abcd,de->abce", (6, 6, 5), name="einsum"), name="sn_einsum"
    )(x)
    tokens = keras.Input((3,), dtype="int32")
    embedded = layers.SpectralNormalization(layers.Embedding(10, 5, name="embed"), name="sn_embed")(
        tokens
    )
    pooled = layers.Concatenate()(
        [layers.GlobalAveragePooling2D()(x), layers.GlobalAveragePooling1D()(embedded)]
    )
    table = table_for(keras.Model([images, tokens], layers.Dense(2, name="head")(pooled)))
    assert (
        table["sn_conv/conv/kernel"]["route"],
        table["sn_conv/conv/kernel"]["matrix_shape"],
    ) == ("muon", (27, 4))
    assert table["sn_conv/conv/kernel"]["reason"] == "Conv2D kernel"
    assert table["sn_einsum/einsum/kernel"]["matrix_shape"] == (4, 5)
    assert table["sn_embed/embed/embeddings"]["route"] == "adamw"


@pytest.mark.parametrize("lora", ["muon", "adamw"])
def test_lora_factors_of_a_dense_kernel_are_matrices_of_their_own(lora):
    dense = layers.Dense(6, name="adapted")
    inputs = keras.Input((4,))
    hidden = dense(inputs)
    dense.enable_lora(2)
    table = table_for(keras.Model(inputs, layers.Dense(2, name="head")(hidden)), lora=lora)
    for name, shape in (("lora_kernel_a", (4, 2)), ("lora_kernel_b", (2, 6))):
        row = table[f"adapted/{name}"]
        reason = f"LoRA factor {name} of Dense kernel (rank 2)"
        if lora == "muon":
            assert (row["route"], row["reason"], row["matrix_shape"]) == ("muon", reason, shape)
        else:
            assert (row["route"], row["reason"]) == ("adamw", f"{reason}, lora='adamw'")
    assert "adapted/kernel" not in table  # frozen by LoRA


@pytest.mark.parametrize("per_head", [False, True])
def test_lora_factors_of_attention_projections(per_head):
    # Query (d_model 8, 2 heads, head_dim 3): A is (8, 2, r), B (r, 3);
    # output (2, 3, 8): A (2, 3, r), B (r, 8). A reads and writes what the
    # kernel does but the last axis, which it writes as the rank.
    inputs = keras.Input((5, 8))
    attention = layers.MultiHeadAttention(2, 3, name="attention")
    model = keras.Model(inputs, layers.Dense(2, name="head")(attention(inputs, inputs)))
    attention.query_dense.enable_lora(4)
    attention.output_dense.enable_lora(4)
    optimizer = keras_muon.Muon(per_head=per_head)
    optimizer.attach(model)
    optimizer.build(model.trainable_variables)
    views = {
        v.path: s.route.view
        for v, s in zip(optimizer._trainable_variables, optimizer._states)
        if "lora" in v.path
    }
    shapes = {path: (view.matrix_shape, view.num_blocks) for path, view in views.items()}
    assert shapes == {
        "attention/query/lora_kernel_a": ((8, 4), 2) if per_head else ((8, 8), 1),
        "attention/query/lora_kernel_b": ((4, 3), 1),
        "attention/attention_output/lora_kernel_a": ((3, 4), 2) if per_head else ((6, 4), 1),
        "attention/attention_output/lora_kernel_b": ((4, 8), 1),
    }
    # The rank is A's last axis and B's first, not the shortest axis (2 heads).
    reasons = [
        s.route.reason
        for v, s in zip(optimizer._trainable_variables, optimizer._states)
        if "lora" in v.path
    ]
    assert len(reasons) == 4 and all(
        r.endswith("(rank 4)" + (" per head" if per_head and "_a" in r else "")) for r in reasons
    ), reasons
    a = np.random.default_rng(0).normal(size=(8, 2, 4)).astype("float32")
    blocks = ops.convert_to_numpy(views["attention/query/lora_kernel_a"].to_blocks(a))
    expected = a.transpose(1, 0, 2) if per_head else a.reshape(1, 8, 8)
    np.testing.assert_array_equal(blocks, expected)


def test_a_conv_with_one_channel_per_group_is_depthwise():
    images = keras.Input((8, 8, 4))
    x = layers.Conv2D(4, 3, groups=4, name="depthwise")(images)  # as in ConvNeXt
    x = layers.Conv2D(8, 3, groups=4, name="multiplier")(x)  # 1 channel in, 2 out
    table = table_for(keras.Model(images, layers.Dense(2, name="head")(x)))
    assert table["depthwise/kernel"]["route"] == "adamw"
    assert table["depthwise/kernel"]["reason"] == "Conv2D depthwise kernel (groups=channels)"
    assert (
        table["multiplier/kernel"]["matrix_shape"],
        table["multiplier/kernel"]["num_blocks"],
    ) == ((9, 2), 4)
