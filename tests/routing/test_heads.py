"""Finding output heads: functional, nested, subclassed and keras-hub
models, tied embeddings, masks."""

import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

import keras_muon
from tests.helpers import routes
from tests.helpers import table_for


def test_output_head_inside_a_nested_model():
    head = keras.Sequential(
        [layers.Dense(8, name="inner_hidden"), layers.Dense(3, name="inner_out")]
    )
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
        inputs,
        {
            "sequence": layers.Dense(8, name="last")(hidden),
            "pooled": layers.Dense(8, name="pooler")(hidden),
        },
    )
    outer_inputs = keras.Input((4,))
    outputs = layers.Dense(2, name="classifier")(backbone(outer_inputs)["sequence"])
    model = keras.Model(outer_inputs, layers.Dropout(0.1)(outputs))
    table = routes(table_for(model))
    assert table["classifier/kernel"] == "adamw"
    assert table["last/kernel"] == table["pooler/kernel"] == table["shared/kernel"] == "muon"


@pytest.mark.parametrize("add", [layers.Add(), lambda tensors: tensors[0] + tensors[1]])
def test_a_branch_added_into_a_residual_output_is_not_a_head(add):
    # The residual stream is the output: `last` writes into it, as the
    # last feed-forward projection of a transformer backbone does.
    inputs = keras.Input((8,))
    h = layers.Dense(8, name="h")(inputs)
    outputs = add([h, layers.Dense(8, name="last")(h)])
    table = table_for(keras.Model(inputs, outputs))
    assert routes(table) == {
        "h/kernel": "muon",
        "h/bias": "adamw",
        "last/kernel": "muon",
        "last/bias": "adamw",
    }
    assert table["last/kernel"]["reason"] == "Dense kernel"


def test_independent_branches_added_at_the_output_are_heads():
    inputs = keras.Input((8,))
    h = layers.Dense(8, name="h")(inputs)
    outputs = layers.Add()([layers.Dense(3, name="left")(h), layers.Dense(3, name="right")(h)])
    table = routes(table_for(keras.Model(inputs, outputs)))
    assert table["left/kernel"] == table["right/kernel"] == "adamw"
    assert table["h/kernel"] == "muon"


def test_a_head_after_a_residual_stream_is_still_the_head():
    inputs = keras.Input((8,))
    h = layers.Dense(8, name="h")(inputs)
    stream = h + layers.Dense(8, name="branch")(h)
    outputs = layers.Dense(3, name="head")(layers.LayerNormalization()(stream))
    table = routes(table_for(keras.Model(inputs, outputs)))
    assert table["head/kernel"] == "adamw"
    assert table["branch/kernel"] == table["h/kernel"] == "muon"


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


def test_keras_hub_gpt2():
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=8,
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


def test_functional_logits_from_the_embedding_table():
    tokens = keras.Input((5,), dtype="int32")
    embedding = layers.Embedding(30, 8, name="tok")
    x = layers.Dense(8, name="mixer")(embedding(tokens))
    logits = ops.einsum("btd,vd->btv", x, embedding.embeddings)
    table = table_for(keras.Model(tokens, logits))
    assert routes(table) == {
        "tok/embeddings": "adamw",
        "mixer/kernel": "muon",
        "mixer/bias": "adamw",
    }
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
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
        **extra,
    )
    table = table_for(getattr(keras_hub.models, task)(backbone=backbone, preprocessor=None))
    assert table["mlm_head/intermediate_dense/kernel"]["route"] == "muon"
    heads = {path for path, row in table.items() if "output head" in row["reason"]}
    # The head is the tied table, or ESM's own output kernel.
    assert heads and all(path.endswith(("embeddings", "output_kernel")) for path in heads), heads


def test_keras_hub_gemma3n_altup_projections_stay_on_muon():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.Gemma3nBackbone(
        text_vocab_size=64,
        text_hidden_size=16,
        num_hidden_layers=1,
        pad_token_id=0,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=[32],
        hidden_activation="gelu_approximate",
        layer_types=["full_attention"],
        sliding_window=8,
        rope_theta=10000.0,
        max_position_embeddings=32,
        vocab_size_per_layer_input=64,
        hidden_size_per_layer_input=4,
        altup_num_inputs=3,
        laurel_rank=2,
    )
    table = table_for(keras_hub.models.Gemma3nCausalLM(backbone=backbone, preprocessor=None))
    projections = [p for p in table if "altup_unembed_projection" in p]
    assert len(projections) == 2
    assert all(table[p]["route"] == "muon" for p in projections)
    assert not any("output head" in row["reason"] for row in table.values())


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
    before = {
        id(layer): (len(layer._inbound_nodes), len(layer._outbound_nodes))
        for layer in model._flatten_layers()
    }
    table_for(model)
    after = {
        id(layer): (len(layer._inbound_nodes), len(layer._outbound_nodes))
        for layer in model._flatten_layers()
    }
    assert after == before


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
        vocabulary_size=64,
        filter_dim=16,
        encoder_num_layers=1,
        decoder_num_layers=1,
        hidden_dim=16,
        intermediate_dim=32,
        encoder_num_heads=2,
        decoder_num_heads=2,
    )
    table = table_for(backbone)
    assert table["conv3/kernel"]["route"] == "muon"


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
    # `x + head(...)` is a residual output: `head` writes into it.
    assert table[model.head.kernel.path]["reason"] == "Dense kernel"
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
