"""Finding the model and routing its variables: by layer type, not by
name; exclusions, tied weights, custom loops."""

import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

import keras_muon
from keras_muon.routing import route
from tests.helpers import routes
from tests.helpers import table_for


def misleadingly_named_model():
    tokens = keras.Input((12,), dtype="int32")
    x = layers.Embedding(50, 16, name="tok")(tokens)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dense(32, activation="relu", name="embedding_mixer")(x)
    x = layers.Dense(5, name="proj")(x)
    probabilities = layers.Activation("softmax")(x)
    return keras.Model(tokens, probabilities)


MISLEADING_NAMES = {
    "tok/embeddings": "adamw",
    "embedding_mixer/kernel": "muon",
    "embedding_mixer/bias": "adamw",
    "proj/kernel": "adamw",
    "proj/bias": "adamw",
}


def test_routes_by_layer_type_not_name_under_fit():
    model = misleadingly_named_model()
    optimizer = keras_muon.Muon()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    tokens = np.random.default_rng(0).integers(0, 50, size=(8, 12))
    model.fit(tokens, np.arange(8) % 5, epochs=1, verbose=0)
    table = {row["path"]: row for row in optimizer.routing_table()}
    assert routes(table) == MISLEADING_NAMES
    assert table["tok/embeddings"]["reason"] == "embedding (Embedding)"
    assert table["proj/kernel"]["reason"] == "output head (Dense 'proj')"
    assert table["embedding_mixer/kernel"]["matrix_shape"] == (16, 32)
    assert table["embedding_mixer/kernel"]["scale"] == pytest.approx(0.2 * np.sqrt(32))
    assert table["proj/kernel"]["matrix_shape"] is None
    assert table["proj/kernel"]["scale"] is None


def test_exclude_layers():
    table = table_for(misleadingly_named_model(), exclude_layers=["mixer"])
    assert table["embedding_mixer/kernel"]["route"] == "adamw"
    assert table["embedding_mixer/kernel"]["reason"] == "exclude_layers 'mixer'"


def trainable_variables_of_a_hidden_model():
    # Returns the variables alone: no frame holds the model afterwards.
    return misleadingly_named_model().trainable_variables


def test_without_its_model_routes_by_variable_and_says_so():
    optimizer = keras_muon.Muon()
    optimizer.build(trainable_variables_of_a_hidden_model())
    table = {row["path"]: row for row in optimizer.routing_table()}
    # A 2-D kernel is read as Dense, including the output head.
    assert table["proj/kernel"]["route"] == "muon"
    assert table["proj/kernel"]["reason"] == "layer not found: 2-D kernel as Dense"
    assert table["tok/embeddings"]["route"] == "adamw"
    assert table["tok/embeddings"]["reason"] == "layer not found"


def test_attach_names_the_model_in_custom_loops():
    model = misleadingly_named_model()
    optimizer = keras_muon.Muon()
    optimizer.attach(model)
    variables = model.trainable_variables
    del model
    grads = [ops.ones(v.shape) for v in variables]
    optimizer.apply(grads, variables)
    assert routes({row["path"]: row for row in optimizer.routing_table()}) == MISLEADING_NAMES


def test_model_in_the_caller_is_found_in_custom_loops():
    model = misleadingly_named_model()
    optimizer = keras_muon.Muon()
    optimizer.apply(
        [ops.ones(v.shape) for v in model.trainable_variables], model.trainable_variables
    )
    assert routes({row["path"]: row for row in optimizer.routing_table()}) == MISLEADING_NAMES


class SharedTable(keras.layers.Layer):
    """Holds another layer's variable directly (tied weights)."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = table

    def call(self, x):
        return x @ self.table


def test_tied_variable_goes_to_adamw_if_any_owner_says_so(isolated_rules):
    keras_muon.register_layer_rule(
        SharedTable,
        lambda layer, variable, per_head: keras_muon.Route(
            keras_muon.MatrixView.from_axes(variable.shape, (0,), (1,)), "shared"
        ),
    )
    tokens = keras.Input((3,), dtype="int32")
    embedding = layers.Embedding(8, 8, name="embed")
    embedding.build()
    x = SharedTable(embedding.embeddings, name="shared")(embedding(tokens))
    outputs = layers.Dense(2, name="head")(x)
    table = table_for(keras.Model(tokens, outputs))
    assert table["embed/embeddings"]["route"] == "adamw"
    shared = x._keras_history.operation
    for owners in ([embedding, shared], [shared, embedding]):
        chosen = route._route_shared(embedding.embeddings, owners, False, {})
        assert chosen.reason == "embedding (Embedding)"


def test_attach_errors():
    optimizer = keras_muon.Muon()
    with pytest.raises(ValueError, match="keras.Model"):
        optimizer.attach("model")
    model = misleadingly_named_model()
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="before the optimizer is built"):
        optimizer.attach(model)


class Unreadable:
    """An object whose class cannot even be looked up, as some proxies do."""

    @property
    def __class__(self):
        raise RuntimeError("no class")


def test_odd_objects_on_the_call_stack_are_skipped():
    unreadable = Unreadable()  # noqa: F841 (a local of this frame)
    table = table_for(misleadingly_named_model())
    assert routes(table) == MISLEADING_NAMES


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.Variable")
def test_raw_tf_variables():
    import tensorflow as tf

    weights = tf.Variable(np.ones((4, 3), "float32"), name="weights")
    bias = tf.Variable(np.ones(3, "float32"), name="bias")
    optimizer = keras_muon.Muon(learning_rate=0.1, exclude_layers=["weights"])
    optimizer.apply_gradients([(tf.ones((4, 3)), weights), (tf.ones(3), bias)])
    table = {row["path"]: row for row in optimizer.routing_table()}
    assert table["weights:0"]["reason"] == "exclude_layers 'weights'"
    assert table["bias:0"]["reason"] == "layer not found"
    printed = []
    optimizer.summary(print_fn=printed.append)
    assert "weights:0" in printed[0] and "bias:0" in printed[0]
    keras_adamw = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.004)
    expected = tf.Variable(np.ones(3, "float32"))
    keras_adamw.apply_gradients([(tf.ones(3), expected)])
    np.testing.assert_allclose(bias.numpy(), expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("train", ["fit", "train_on_batch"])
def test_sequential_model_built_by_training(train):
    model = keras.Sequential([layers.Dense(8, name="hidden"), layers.Dense(2, name="out")])
    optimizer = keras_muon.Muon()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = np.ones((4, 3)), np.ones((4, 2))
    if train == "fit":
        model.fit(x, y, verbose=0)
    else:
        model.train_on_batch(x, y)
    table = {row["path"]: row["route"] for row in optimizer.routing_table()}
    hidden, out = model.layers
    assert table[hidden.kernel.path] == "muon"
    assert table[out.kernel.path] == "adamw"
