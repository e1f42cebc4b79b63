import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

import keras_muon
from keras_muon import matrix_views
from keras_muon import routing


def table_for(model, **kwargs):
    """{path: row} of the routing table, built the way `fit` builds it."""
    optimizer = keras_muon.Muon(**kwargs)
    model.compile(optimizer=optimizer, loss="mse")
    model.optimizer.build(model.trainable_variables)
    return {row["path"]: row for row in optimizer.routing_table()}


def routes(table):
    return {path: row["route"] for path, row in table.items()}


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


def test_routing_table_rows():
    table = table_for(misleadingly_named_model())
    row = table["embedding_mixer/kernel"]
    assert row == {
        "path": "embedding_mixer/kernel",
        "shape": (16, 32),
        "route": "muon",
        "reason": "Dense kernel",
        "matrix_shape": (16, 32),
        "num_blocks": 1,
        "scale": pytest.approx(0.2 * np.sqrt(32)),
    }


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


def test_output_head_inside_a_nested_model():
    head = keras.Sequential([layers.Dense(8, name="inner_hidden"), layers.Dense(3, name="inner_out")])
    inputs = keras.Input((4,))
    outputs = layers.Softmax()(head(layers.Dense(8, name="outer")(inputs)))
    table = table_for(keras.Model(inputs, outputs))
    inner_hidden, inner_out = head.layers
    assert table["outer/kernel"]["route"] == "muon"
    assert table[inner_hidden.kernel.path]["route"] == "muon"
    assert table[inner_out.kernel.path]["route"] == "adamw"


def test_multiple_outputs_are_all_heads():
    inputs = keras.Input((4,))
    hidden = layers.Dense(8, name="hidden")(inputs)
    first = layers.Dense(2, name="first")(hidden)
    second = layers.Dense(3, name="second")(hidden)
    both = layers.Concatenate()([first, second])
    table = table_for(keras.Model(inputs, both))
    assert routes(table)["hidden/kernel"] == "muon"
    assert routes(table)["first/kernel"] == routes(table)["second/kernel"] == "adamw"


def test_only_the_used_output_of_a_nested_model_is_followed():
    inputs = keras.Input((4,))
    hidden = layers.Dense(8, name="shared")(inputs)
    backbone = keras.Model(
        inputs, {"sequence": layers.Dense(8, name="last")(hidden), "pooled": layers.Dense(8, name="pooler")(hidden)}
    )
    outer_inputs = keras.Input((4,))
    outputs = layers.Dense(2, name="classifier")(backbone(outer_inputs)["sequence"])
    model = keras.Model(outer_inputs, layers.Dropout(0.1)(outputs))
    table = routes(table_for(model))
    assert table["classifier/kernel"] == "adamw"
    assert table["last/kernel"] == table["pooler/kernel"] == table["shared/kernel"] == "muon"


def test_residual_output_does_not_make_the_skip_branch_a_head():
    inputs = keras.Input((8,))
    h = layers.Dense(8, name="h")(inputs)
    outputs = layers.Add()([h, layers.Dense(8, name="last")(h)])
    table = routes(table_for(keras.Model(inputs, outputs)))
    assert table["last/kernel"] == "adamw"
    assert table["h/kernel"] == "muon"


def test_normalization_after_the_head_is_walked_through():
    inputs = keras.Input((8,))
    x = layers.Dense(8, name="hidden")(inputs)
    x = layers.LayerNormalization(name="norm")(layers.Dense(4, name="head")(x))
    table = routes(table_for(keras.Model(inputs, x)))
    assert table["head/kernel"] == "adamw"
    assert table["hidden/kernel"] == "muon"


def test_a_frozen_output_layer_is_the_head():
    inputs = keras.Input((8,))
    x = layers.Dense(8, name="hidden")(inputs)
    frozen = layers.Dense(4, name="frozen")
    frozen.trainable = False
    table = routes(table_for(keras.Model(inputs, frozen(x))))
    assert table == {"hidden/kernel": "muon", "hidden/bias": "adamw"}


def test_composite_output_layer_marks_only_its_last_projection():
    tokens = keras.Input((6, 8))
    outputs = layers.MultiHeadAttention(2, 4, name="mha")(tokens, tokens)
    table = table_for(keras.Model(tokens, outputs))
    assert table["mha/attention_output/kernel"]["route"] == "adamw"
    # Traced through its `call`: known, not guessed.
    reason = table["mha/attention_output/kernel"]["reason"]
    assert reason == "output head (EinsumDense 'attention_output')"
    for name in ["query", "key", "value"]:
        assert table[f"mha/{name}/kernel"]["route"] == "muon"


class SubclassedClassifier(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = layers.Dense(8)
        self.classifier = layers.Dense(3)
        self.norm = layers.LayerNormalization()

    def call(self, x):
        return self.classifier(self.norm(self.hidden(x)))


def test_subclassed_model_is_traced_to_its_head():
    model = SubclassedClassifier()
    model(np.ones((1, 4)))
    table = table_for(model)
    hidden = table[model.hidden.kernel.path]
    head = table[model.classifier.kernel.path]
    assert hidden["route"] == "muon"
    assert head["route"] == "adamw"
    assert head["reason"] == f"output head (Dense '{model.classifier.name}')"


class Decoder(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = layers.Dense(8)
        self.decoder = keras.Sequential([layers.Dense(8), layers.Dense(3)])

    def call(self, x):
        return self.decoder(self.hidden(x))


def test_subclassed_model_with_a_sequential_decoder():
    model = Decoder()
    model(np.ones((1, 4)))
    table = routes(table_for(model))
    first, last = model.decoder.layers
    assert table[last.kernel.path] == "adamw"
    assert table[first.kernel.path] == table[model.hidden.kernel.path] == "muon"


class Distiller(keras.Model):
    def __init__(self, student, teacher):
        super().__init__()
        self.student = student
        self.teacher = teacher

    def call(self, x):
        return self.student(x)


def functional_classifier(prefix):
    inputs = keras.Input((4,))
    x = layers.Dense(8, name=f"{prefix}_hidden")(inputs)
    return keras.Model(inputs, layers.Dense(3, name=f"{prefix}_logits")(x))


def test_subclassed_model_training_one_functional_part():
    distiller = Distiller(functional_classifier("student"), functional_classifier("teacher"))
    optimizer = keras_muon.Muon()
    distiller.compile(optimizer=optimizer, loss="mse")
    optimizer.build(distiller.student.trainable_variables)
    table = routes({row["path"]: row for row in optimizer.routing_table()})
    assert table["student_hidden/kernel"] == "muon"
    assert table["student_logits/kernel"] == "adamw"


def test_reversible_embedding_used_as_lm_head():
    embedding = layers.ReversibleEmbedding(30, 8, tie_weights=True, name="tied")
    tokens = keras.Input((5,), dtype="int32")
    x = layers.Dense(8, name="mixer")(embedding(tokens))
    model = keras.Model(tokens, embedding(x, reverse=True))
    assert routes(table_for(model)) == {
        "tied/embeddings": "adamw",
        "mixer/kernel": "muon",
        "mixer/bias": "adamw",
    }


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


@pytest.fixture
def isolated_rules(monkeypatch):
    monkeypatch.setattr(matrix_views, "_RULES", dict(matrix_views._RULES))


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
        route = routing._route_shared(embedding.embeddings, owners, False)
        assert route.reason == "embedding (Embedding)"


def test_routing_table_needs_a_built_optimizer():
    with pytest.raises(ValueError, match="not built"):
        keras_muon.Muon().routing_table()


def test_attach_errors():
    optimizer = keras_muon.Muon()
    with pytest.raises(ValueError, match="keras.Model"):
        optimizer.attach("model")
    model = misleadingly_named_model()
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="before the optimizer is built"):
        optimizer.attach(model)


def test_summary_prints_every_variable():
    model = misleadingly_named_model()
    optimizer = keras_muon.Muon()
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    printed = []
    optimizer.summary(print_fn=printed.append)
    text = printed[0]
    for path in MISLEADING_NAMES:
        assert path in text
    assert "16×32" in text
    assert "muon: 1 variables, 512 parameters" in text


def test_keras_hub_gpt2():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=8,
    )
    table = table_for(keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None))
    block = "transformer_layer_0"
    # The tied token embedding is also the LM head.
    assert table["token_embedding/embeddings"]["route"] == "adamw"
    assert table["position_embedding/embeddings"]["reason"] == "embedding (PositionEmbedding)"
    for name in ["query", "key", "value", "attention_output"]:
        row = table[f"{block}/self_attention/{name}/kernel"]
        assert (row["route"], row["matrix_shape"]) == ("muon", (16, 16))
        assert table[f"{block}/self_attention/{name}/bias"]["route"] == "adamw"
    assert table[f"{block}/feedforward_intermediate_dense/kernel"]["matrix_shape"] == (16, 32)
    muon = [path for path, row in table.items() if row["route"] == "muon"]
    assert len(muon) == 6


class Unreadable:
    """An object whose class cannot even be looked up, as some proxies do."""

    @property
    def __class__(self):
        raise RuntimeError("no class")


def test_odd_objects_on_the_call_stack_are_skipped():
    unreadable = Unreadable()  # noqa: F841 (a local of this frame)
    table = table_for(misleadingly_named_model())
    assert routes(table) == MISLEADING_NAMES


# Tied heads: the logits come from the embedding table, which is the head.


def test_functional_logits_from_the_embedding_table():
    tokens = keras.Input((5,), dtype="int32")
    embedding = layers.Embedding(30, 8, name="tok")
    x = layers.Dense(8, name="mixer")(embedding(tokens))
    logits = ops.einsum("btd,vd->btv", x, embedding.embeddings)
    table = table_for(keras.Model(tokens, logits))
    assert routes(table) == {"tok/embeddings": "adamw", "mixer/kernel": "muon", "mixer/bias": "adamw"}
    assert table["tok/embeddings"]["reason"] == "output head (Einsum with tok/embeddings)"


class TiedLanguageModel(keras.Model):
    """Logits from the transposed table, computed outside the graph, or
    from a `ReversibleEmbedding` called in reverse."""

    def __init__(self, reversible):
        super().__init__()
        self.reversible = reversible
        if reversible:
            self.embedding = layers.ReversibleEmbedding(30, 8, tie_weights=True)
        else:
            self.embedding = layers.Embedding(30, 8)
        self.mixer = layers.Dense(8)

    def call(self, tokens):
        x = self.mixer(self.embedding(tokens))
        if self.reversible:
            return self.embedding(x, reverse=True)
        return ops.matmul(x, ops.transpose(self.embedding.embeddings))


@pytest.mark.parametrize("reversible", [False, True])
def test_subclassed_tied_language_model(reversible):
    model = TiedLanguageModel(reversible)
    model(np.zeros((2, 5), "int32"))
    table = table_for(model)
    assert table[model.mixer.kernel.path]["route"] == "muon"
    assert table[model.embedding.embeddings.path]["route"] == "adamw"
    assert not any("guessed" in row["reason"] for row in table.values())


MASKED_LMS = {
    "BertMaskedLM": ("BertBackbone", {}),
    "RobertaMaskedLM": ("RobertaBackbone", {}),
    "DistilBertMaskedLM": ("DistilBertBackbone", {}),
    "AlbertMaskedLM": ("AlbertBackbone", {"embedding_dim": 8}),
    "ESMMaskedPLM": ("ESMBackbone", {}),
}


@pytest.mark.parametrize("task", list(MASKED_LMS))
def test_keras_hub_masked_lm_heads_keep_their_hidden_projection_on_muon(task):
    keras_hub = pytest.importorskip("keras_hub")
    backbone_name, extra = MASKED_LMS[task]
    backbone = getattr(keras_hub.models, backbone_name)(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=16, **extra,
    )
    table = table_for(getattr(keras_hub.models, task)(backbone=backbone, preprocessor=None))
    assert table["mlm_head/intermediate_dense/kernel"]["route"] == "muon"
    heads = {path for path, row in table.items() if "output head" in row["reason"]}
    # The head is the tied table, or ESM's own output kernel.
    assert heads and all(path.endswith(("embeddings", "output_kernel")) for path in heads), heads


def test_keras_hub_gemma3n_altup_projections_stay_on_muon():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.Gemma3nBackbone(
        text_vocab_size=64, text_hidden_size=16, num_hidden_layers=1, pad_token_id=0,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=[32],
        hidden_activation="gelu_approximate", layer_types=["full_attention"],
        sliding_window=8, rope_theta=10000.0, max_position_embeddings=32,
        vocab_size_per_layer_input=64, hidden_size_per_layer_input=4,
        altup_num_inputs=3, laurel_rank=2,
    )
    table = table_for(keras_hub.models.Gemma3nCausalLM(backbone=backbone, preprocessor=None))
    projections = [p for p in table if "altup_unembed_projection" in p]
    assert len(projections) == 2
    assert all(table[p]["route"] == "muon" for p in projections)
    assert not any("output head" in row["reason"] for row in table.values())


# Subclassed models are traced: the head is the layer that computes the output.


class HeadDeclaredFirst(keras.Model):
    def __init__(self):
        super().__init__()
        self.head = layers.Dense(3)
        self.hidden = layers.Dense(8)
        self.auxiliary = layers.Dense(4)  # built, trained elsewhere, not called here

    def build(self, input_shape):
        self.auxiliary.build((None, 8))

    def call(self, x):
        return self.head(self.hidden(x))


def test_subclassed_model_head_declared_first_and_an_unused_layer_after_it():
    model = HeadDeclaredFirst()
    model(np.ones((2, 4)))
    table = table_for(model)
    assert table[model.head.kernel.path]["route"] == "adamw"
    assert table[model.hidden.kernel.path]["route"] == "muon"
    assert table[model.auxiliary.kernel.path]["route"] == "muon"


class Untraceable(SubclassedClassifier):
    def call(self, x):
        # NumPy needs values: no symbolic trace of this model is possible.
        return super().call(x) * float(np.mean(ops.convert_to_numpy(x)) ** 0)


def test_a_subclassed_model_that_cannot_be_traced_is_guessed():
    model = Untraceable()
    model(np.ones((1, 4)))
    table = table_for(model)
    head = table[model.classifier.kernel.path]
    assert head["route"] == "adamw"
    assert "guessed" in head["reason"]


def test_tracing_leaves_the_layers_as_they_were():
    model = HeadDeclaredFirst()
    model(np.ones((2, 4)))
    before = {id(l): (len(l._inbound_nodes), len(l._outbound_nodes)) for l in model._flatten_layers()}
    table_for(model)
    after = {id(l): (len(l._inbound_nodes), len(l._outbound_nodes)) for l in model._flatten_layers()}
    assert after == before


# Outputs that are not predictions make no head.


class ValidPositions(layers.Layer):
    """1.0 where a position is within the length: depends on `features`
    through its shape only."""

    def call(self, features, lengths):
        positions = ops.arange(ops.shape(features)[1])
        return ops.cast(ops.less(positions[None, :], lengths[:, None]), "float32")


class BooleanMask(ValidPositions):
    """The same as booleans, declaring only its output shape (so Keras
    declares a float output)."""

    def call(self, features, lengths):
        # A backend tensor compared with a symbolic one: this cannot be
        # traced symbolically on JAX (keras-hub's Moonshine does this).
        positions = ops.arange(ops.shape(features)[1])
        return ops.cast(positions[None, :] < lengths[:, None], "bool")

    def compute_output_shape(self, features_shape, lengths_shape):
        return (features_shape[0], features_shape[1])


@pytest.mark.parametrize("mask_layer", [ValidPositions, BooleanMask])
def test_outputs_that_depend_on_a_layer_only_through_its_shape(mask_layer):
    features = keras.Input((6, 4))
    lengths = keras.Input((), dtype="int32")
    hidden = layers.Conv1D(4, 3, padding="same", name="conv")(features)
    outputs = {
        "sequence": layers.Dense(4, name="proj")(hidden),
        "mask": mask_layer()(hidden, lengths),
        "positive": ops.greater(hidden, 0.0),  # boolean
    }
    table = routes(table_for(keras.Model([features, lengths], outputs)))
    assert table["conv/kernel"] == "muon"
    assert table["proj/kernel"] == "adamw"


def test_keras_hub_moonshine_mask_output_makes_no_head():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.MoonshineBackbone(
        vocabulary_size=64, filter_dim=16, encoder_num_layers=1, decoder_num_layers=1,
        hidden_dim=16, intermediate_dim=32, encoder_num_heads=2, decoder_num_heads=2,
    )
    table = table_for(backbone)
    assert table["conv3/kernel"]["route"] == "muon"


# Wrappers route as the layer they wrap.


def test_spectral_normalization_routes_as_the_wrapped_layer():
    images = keras.Input((8, 8, 3))
    x = layers.SpectralNormalization(layers.Conv2D(4, 3, name="conv"), name="sn_conv")(images)
    x = layers.SpectralNormalization(
        layers.EinsumDense("abcd,de->abce", (6, 6, 5), name="einsum"), name="sn_einsum"
    )(x)
    tokens = keras.Input((3,), dtype="int32")
    embedded = layers.SpectralNormalization(layers.Embedding(10, 5, name="embed"), name="sn_embed")(tokens)
    pooled = layers.Concatenate()(
        [layers.GlobalAveragePooling2D()(x), layers.GlobalAveragePooling1D()(embedded)]
    )
    table = table_for(keras.Model([images, tokens], layers.Dense(2, name="head")(pooled)))
    assert (table["sn_conv/conv/kernel"]["route"], table["sn_conv/conv/kernel"]["matrix_shape"]) == ("muon", (27, 4))
    assert table["sn_conv/conv/kernel"]["reason"] == "Conv2D kernel"
    assert table["sn_einsum/einsum/kernel"]["matrix_shape"] == (4, 5)
    assert table["sn_embed/embed/embeddings"]["route"] == "adamw"


def test_lora_factors_say_what_they_are():
    dense = layers.Dense(6, name="adapted")
    inputs = keras.Input((4,))
    hidden = dense(inputs)
    dense.enable_lora(2)
    table = table_for(keras.Model(inputs, layers.Dense(2, name="head")(hidden)))
    for name in ("lora_kernel_a", "lora_kernel_b"):
        row = table[f"adapted/{name}"]
        assert (row["route"], row["reason"]) == ("adamw", f"Dense {name}: LoRA factor of rank 2")
    assert "adapted/kernel" not in table  # frozen by LoRA


# Raw backend variables have no path: their name stands in for it.


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


def test_a_conv_with_one_channel_per_group_is_depthwise():
    images = keras.Input((8, 8, 4))
    x = layers.Conv2D(4, 3, groups=4, name="depthwise")(images)  # as in ConvNeXt
    x = layers.Conv2D(8, 3, groups=4, name="multiplier")(x)  # 1 channel in, 2 out
    table = table_for(keras.Model(images, layers.Dense(2, name="head")(x)))
    assert table["depthwise/kernel"]["route"] == "adamw"
    assert table["depthwise/kernel"]["reason"] == "Conv2D depthwise kernel (groups=channels)"
    assert (table["multiplier/kernel"]["matrix_shape"], table["multiplier/kernel"]["num_blocks"]) == ((9, 2), 4)


@pytest.mark.parametrize("wrapper", ["TimeDistributed", "Bidirectional"])
def test_composite_wrappers_at_the_output(wrapper):
    inputs = keras.Input((5, 8))
    hidden = layers.Dense(8, name="hidden")(inputs)
    if wrapper == "TimeDistributed":
        outputs = layers.TimeDistributed(layers.Dense(3, name="inner"))(hidden)
    else:
        outputs = layers.Bidirectional(layers.LSTM(3))(hidden)
    table = table_for(keras.Model(inputs, outputs))
    assert table["hidden/kernel"]["route"] == "muon"
    heads = [p for p, row in table.items() if "output head" in row["reason"]]
    assert heads and all("hidden" not in p for p in heads)


class ResidualCounting(keras.Model):
    """A residual output, two outputs (one not from a layer), and a call
    with a side effect on a variable."""

    def __init__(self):
        super().__init__()
        self.hidden = layers.Dense(4)
        self.head = layers.Dense(4)
        self.calls = keras.Variable(0.0, trainable=False)

    def call(self, x):
        self.calls.assign_add(1.0)
        return x + self.head(self.hidden(x)), ops.mean(x, axis=-1)


def test_subclassed_residual_model_is_traced_without_side_effects():
    model = ResidualCounting()
    model(np.ones((2, 4)))
    table = table_for(model)
    assert table[model.head.kernel.path]["reason"] == f"output head (Dense '{model.head.name}')"
    assert table[model.hidden.kernel.path]["route"] == "muon"
    assert float(ops.convert_to_numpy(model.calls)) == 1.0  # tracing assigned nothing


class OutputsAttribute(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = layers.Dense(4)
        self.outputs = [layers.Dense(2), layers.Dense(3)]  # not symbolic tensors

    def call(self, x):
        hidden = self.hidden(x)
        return [head(hidden) for head in self.outputs]


def test_an_attribute_named_outputs_is_not_taken_for_the_graph():
    model = OutputsAttribute()
    model(np.ones((2, 4)))
    table = table_for(model)
    assert table[model.hidden.kernel.path]["route"] == "muon"
    for head in model.outputs:
        assert table[head.kernel.path]["reason"] == f"output head (Dense '{head.name}')"
