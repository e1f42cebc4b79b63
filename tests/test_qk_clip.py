"""QK-Clip: the recorded logits, the clip, its layers and its plumbing."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon import qk_clip
from tests import reference

BATCH, SEQUENCE, WIDTH, VOCABULARY = 4, 8, 16, 32


def attention_model(kind="mha", padding=False):
    """Embedding, then one attention layer named "attention" over it (so
    that its input is the embedding's output), then a Dense head."""
    tokens = keras.Input((SEQUENCE,), dtype="int32")
    inputs = [tokens]
    # Unit-scale embeddings: logits of order 1, each head's max positive.
    x = keras.layers.Embedding(
        VOCABULARY, WIDTH, embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
        name="embedding",
    )(tokens)
    kwargs = {"use_causal_mask": True}
    if padding:
        mask = keras.Input((SEQUENCE, SEQUENCE), dtype="bool")
        inputs.append(mask)
        kwargs["attention_mask"] = mask
    # Non-zero biases: the clip must scale them too to reach τ exactly.
    bias = keras.initializers.RandomNormal(stddev=0.2)
    if kind == "gqa":
        attention = keras.layers.GroupQueryAttention(
            4, 4, 2, bias_initializer=bias, name="attention"
        )
    else:
        dropout = 0.1 if kind == "mha with dropout" else 0.0
        attention = keras.layers.MultiHeadAttention(
            4, 4, dropout=dropout, bias_initializer=bias, name="attention"
        )
    x = x + attention(x, x, **kwargs)
    outputs = keras.layers.Dense(VOCABULARY, name="head")(x)
    return keras.Model(inputs if padding else tokens, outputs)


def batch(padding=False, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCABULARY, (BATCH, SEQUENCE)).astype("int32")
    targets = rng.integers(0, VOCABULARY, (BATCH, SEQUENCE)).astype("int32")
    causal = np.tril(np.ones((SEQUENCE, SEQUENCE), bool))
    if not padding:
        return tokens, targets, causal[None]
    lengths = rng.integers(3, SEQUENCE + 1, BATCH)
    keys = np.arange(SEQUENCE)[None, None, :] < lengths[:, None, None]
    mask = np.broadcast_to(keys, (BATCH, SEQUENCE, SEQUENCE))
    return [tokens, mask], targets, mask & causal


def projections(model, inputs):
    """The attention layer's projected query and key for `inputs`, and the
    factor of its logits."""
    tokens = inputs[0] if isinstance(inputs, list) else inputs
    attention = model.get_layer("attention")
    x = model.get_layer("embedding")(tokens)
    query = ops.convert_to_numpy(attention._query_dense(x))
    key = ops.convert_to_numpy(attention._key_dense(x))
    scale = getattr(attention, "_inverse_sqrt_key_dim", None) or attention._inverse_sqrt_head_dim
    return query, key, scale


def head_logits(model, inputs, mask):
    return reference.head_max_logits(*projections(model, inputs), mask)


def fit_one_step(model, optimizer, inputs, targets, **kwargs):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model.fit(inputs, targets, batch_size=BATCH, epochs=1, verbose=0, **kwargs)


def middle_threshold(logits):
    """A threshold with heads on both sides of it."""
    ordered = np.sort(logits)
    return float((ordered[1] + ordered[-2]) / 2)


def without_learning(seed, kind="mha", padding=False):
    """A model, its batch, each head's largest logit on it, a threshold
    with heads on both sides, and a Muon that only clips (lr 0)."""
    keras.utils.set_random_seed(seed)
    model = attention_model(kind, padding)
    inputs, targets, mask = batch(padding)
    before = head_logits(model, inputs, mask)
    threshold = middle_threshold(before)
    optimizer = keras_muon.Muon(learning_rate=0.0, qk_clip_threshold=threshold)
    return model, (inputs, targets, mask), before, threshold, optimizer


def kernel_slices(model, heads):
    """Each query-head and key-head slice of the attention's kernels."""
    attention = model.get_layer("attention")
    query = ops.convert_to_numpy(attention._query_dense.kernel)
    key = ops.convert_to_numpy(attention._key_dense.kernel)
    return [query[:, h] for h in range(heads)], key


@pytest.mark.parametrize(
    "kind, padding",
    [("mha", False), ("mha", True), ("mha with dropout", False), ("gqa", False), ("gqa", True)],
)
def test_after_a_step_without_learning_the_clipped_heads_reach_the_threshold(kind, padding):
    model, (inputs, targets, mask), before, threshold, optimizer = without_learning(
        1, kind, padding
    )
    clipped = before > threshold
    queries_before, key_before = kernel_slices(model, 4)
    fit_one_step(model, optimizer, inputs, targets)

    recorded = optimizer.max_logits()["attention"]
    np.testing.assert_allclose(recorded, before, rtol=1e-5, atol=1e-6)
    assert optimizer.clipped_heads() == clipped.sum()
    after = head_logits(model, inputs, mask)
    np.testing.assert_allclose(after[clipped], threshold, rtol=1e-5)
    queries_after, key_after = kernel_slices(model, 4)
    if kind == "gqa":
        # Each head's logits are multiplied by its own γ: 1 off the clip.
        np.testing.assert_allclose(after[~clipped], before[~clipped], rtol=1e-5)
    else:
        np.testing.assert_array_equal(after[~clipped], before[~clipped])
        for h in np.flatnonzero(~clipped):
            np.testing.assert_array_equal(queries_after[h], queries_before[h])
            np.testing.assert_array_equal(key_after[:, h], key_before[:, h])


def test_with_learning_the_heads_below_the_threshold_get_the_unclipped_update():
    keras.utils.set_random_seed(2)
    weights = attention_model().get_weights()
    inputs, targets, mask = batch()
    runs = {}
    for threshold in (None, "middle"):
        model = attention_model()
        model.set_weights(weights)
        before = head_logits(model, inputs, mask)
        if threshold == "middle":
            threshold = middle_threshold(before)
        optimizer = keras_muon.Muon(learning_rate=0.02, qk_clip_threshold=threshold)
        fit_one_step(model, optimizer, inputs, targets)
        runs[threshold is None] = (model, threshold)
    (plain, _), (clipped_model, threshold) = runs[True], runs[False]
    query_factors, key_factors = reference.qk_clip_factors(before, threshold, 0.5, 1)
    plain_queries, plain_key = kernel_slices(plain, 4)
    queries, key = kernel_slices(clipped_model, 4)
    # Eager torch runs the same kernels in both runs: bit-identical. XLA
    # (TensorFlow, JAX) compiles the two steps as different programs, whose
    # fusions may round the same update differently in the last bit.
    same = (
        np.testing.assert_array_equal
        if keras.backend.backend() == "torch"
        else lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    )
    for h in range(4):
        if before[h] > threshold:
            np.testing.assert_allclose(queries[h], plain_queries[h] * query_factors[h], rtol=1e-5)
            np.testing.assert_allclose(key[:, h], plain_key[:, h] * key_factors[h], rtol=1e-5)
        else:
            same(queries[h], plain_queries[h])
            same(key[:, h], plain_key[:, h])
    if keras.backend.backend() != "torch":
        return  # AdamW magnifies last-bit differences of tiny gradients
    weights = [w for w in clipped_model.weights if "qk_clip_probe" not in w.path]
    for a, b in zip(plain.weights, weights, strict=True):
        if "query" not in a.path and "key" not in a.path:
            same(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


@pytest.mark.parametrize("group", [1, 2, 4])
def test_clip_factors_match_the_reference(group):
    rng = np.random.default_rng(group)
    logits = rng.uniform(0, 20, 8).astype("float32")
    expected = reference.qk_clip_factors(logits.astype(np.float64), 10.0, 0.3, group)
    actual = qk_clip.clip_factors(ops.convert_to_tensor(logits), 10.0, 0.3, group)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(ops.convert_to_numpy(a), e, rtol=1e-6)
    # Every head's logits are scaled by exactly its own γ.
    query, key = expected
    np.testing.assert_allclose(
        query * np.repeat(key, group), np.minimum(1, 10.0 / logits), rtol=1e-6
    )


def test_head_max_logits_match_the_reference_with_groups_and_masks():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(3, 5, 6, 4)).astype("float32")
    key = rng.normal(size=(3, 7, 2, 4)).astype("float32")
    mask = rng.random((3, 5, 7)) < 0.5
    mask[:, :, 0] = True
    for m in (None, mask):
        expected = reference.head_max_logits(query, key, 0.5, m)
        actual = qk_clip.head_max_logits(
            ops.convert_to_tensor(query), ops.convert_to_tensor(key), 0.5,
            None if m is None else ops.convert_to_tensor(m),
        )
        np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5)


def test_mixed_precision_records_float32_logits_and_clips():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model, (inputs, targets, mask), before, threshold, optimizer = without_learning(3)
        fit_one_step(model, optimizer, inputs, targets)
        attention = model.get_layer("attention")
        assert attention._query_dense.kernel.dtype == "float32"
        assert optimizer.max_logits()["attention"].dtype == np.float32
        # bfloat16 projections: 8 bits of mantissa.
        np.testing.assert_allclose(optimizer.max_logits()["attention"], before, rtol=3e-2)
        after = head_logits(model, inputs, mask)
        assert np.all(after <= threshold * 1.03), (after, threshold)
        assert optimizer.clipped_heads() >= 1
    finally:
        keras.config.set_dtype_policy("float32")


def test_only_training_calls_record_logits():
    model = attention_model()
    optimizer = keras_muon.Muon(qk_clip_threshold=10.0)
    optimizer.attach(model)
    optimizer.build(model.trainable_variables)
    tokens = batch()[0]
    model(tokens, training=False)
    assert model.losses == []
    model(tokens, training=True)
    assert len(model.losses) == 1
    assert float(ops.convert_to_numpy(model.losses[0])) == 0.0  # the probe is zero


def test_probes_are_not_saved_with_the_model(tmp_path):
    model = attention_model()
    optimizer = keras_muon.Muon(qk_clip_threshold=1.0)
    inputs, targets, _ = batch()
    fit_one_step(model, optimizer, inputs, targets)
    assert any("qk_clip_probe" in v.path for v in model.trainable_variables)
    model.save_weights(tmp_path / "clipped.weights.h5")
    fresh = attention_model()
    fresh.load_weights(tmp_path / "clipped.weights.h5")
    for a, b in zip(fresh.weights, [w for w in model.weights if "qk_clip" not in w.path]):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    # And the other way: weights saved without QK-Clip load into a model
    # that has the probes.
    fresh.save_weights(tmp_path / "plain.weights.h5")
    model.load_weights(tmp_path / "plain.weights.h5")


def test_a_missing_probe_gradient_is_an_error_that_says_what_to_do():
    model = attention_model()
    optimizer = keras_muon.Muon(qk_clip_threshold=1.0)
    optimizer.attach(model)
    optimizer.build(model.trainable_variables)
    variables = model.trainable_variables
    grads = [None if "qk_clip_probe" in v.path else ops.zeros(v.shape) for v in variables]
    with pytest.raises(ValueError, match="no gradient for the logit probe of attention"):
        optimizer.apply(grads, variables)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"qk_clip_threshold": 0.0}, "qk_clip_threshold"),
        ({"qk_clip_threshold": -5.0}, "qk_clip_threshold"),
        ({"qk_clip_threshold": 10.0, "qk_clip_alpha": 1.5}, "qk_clip_alpha"),
        ({"qk_clip_threshold": 10.0, "gradient_accumulation_steps": 2}, "accumulation"),
    ],
)
def test_invalid_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_muon.Muon(**kwargs)


@pytest.mark.parametrize("optimizer_type", [keras_muon.Muon, keras_muon.NorMuon, keras_muon.AdaMuon])
def test_config_round_trip_and_summary(optimizer_type):
    optimizer = optimizer_type(qk_clip_threshold=50.0, qk_clip_alpha=0.25)
    config = optimizer.get_config()
    assert config["qk_clip_threshold"] == 50.0 and config["qk_clip_alpha"] == 0.25
    assert optimizer_type.from_config(config).get_config() == config
    model = attention_model("gqa")
    optimizer.attach(model)
    optimizer.build(model.trainable_variables)
    lines = []
    optimizer.summary(print_fn=lines.append)
    text = lines[0]
    assert "QK-Clip: threshold 50, alpha 0.25" in text
    assert "attention        4/2" in text and "clipped" in text
    assert "qk_clip_probe" not in text  # not a weight of the model
    assert all("qk_clip" not in row["path"] for row in optimizer.routing_table())


def test_the_monitor_reports_in_the_history():
    model, (inputs, targets, mask), before, threshold, optimizer = without_learning(4)
    # Two steps on the same batch: the second sees the clipped logits.
    history = fit_one_step(
        model, optimizer, np.concatenate([inputs] * 2), np.concatenate([targets] * 2),
        callbacks=[keras_muon.QKClipMonitor()],
    )
    np.testing.assert_allclose(history.history["max_logit"], [before.max()], rtol=1e-5)
    assert history.history["clipped_heads"][0] >= np.sum(before > threshold)


class PlainAttention(keras.layers.Layer):
    """Attention written by hand, declared to QK-Clip below."""

    def __init__(self, heads, head_dim, normalize=False, **kwargs):
        super().__init__(**kwargs)
        self.normalize = normalize
        self.head_dim = head_dim
        self.q = keras.layers.EinsumDense("btm,mhd->bthd", (None, heads, head_dim))
        self.k = keras.layers.EinsumDense("btm,mhd->bthd", (None, heads, head_dim))
        self.v = keras.layers.EinsumDense("btm,mhd->bthd", (None, heads, head_dim))

    def attend(self, query, key, value):
        logits = ops.einsum("bthd,bshd->bhts", query, key) / np.sqrt(self.head_dim)
        weights = ops.softmax(logits, axis=-1)
        return ops.einsum("bhts,bshd->bthd", weights, value)

    def call(self, x):
        out = self.attend(self.q(x), self.k(x), self.v(x))
        return ops.reshape(out, (-1, x.shape[1], out.shape[2] * out.shape[3]))


def plain_attention_rule(layer):
    if layer.normalize:
        return "QK-norm: scaling the kernels does not change the logits"
    return keras_muon.AttentionSpec(
        query=layer.q, key=layer.k, scale=layer.head_dim**-0.5, method="attend"
    )


keras_muon.register_attention_rule(PlainAttention, plain_attention_rule)


@pytest.mark.parametrize("normalize", [False, True])
def test_a_registered_layer_is_clipped_or_listed_with_its_reason(normalize):
    keras.utils.set_random_seed(5)
    tokens = keras.Input((SEQUENCE,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, WIDTH, name="embedding")(tokens)
    x = PlainAttention(4, 4, normalize=normalize, name="plain")(x)
    model = keras.Model(tokens, keras.layers.Dense(VOCABULARY)(x))
    inputs, targets, _ = batch()
    layer = model.get_layer("plain")
    embedded = model.get_layer("embedding")(inputs)
    before = reference.head_max_logits(
        ops.convert_to_numpy(layer.q(embedded)), ops.convert_to_numpy(layer.k(embedded)), 0.5
    )
    threshold = middle_threshold(before)
    optimizer = keras_muon.Muon(learning_rate=0.0, qk_clip_threshold=threshold)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_one_step(model, optimizer, inputs, targets)
    after = reference.head_max_logits(
        ops.convert_to_numpy(layer.q(embedded)), ops.convert_to_numpy(layer.k(embedded)), 0.5
    )
    lines = []
    optimizer.summary(print_fn=lines.append)
    if normalize:
        assert any("QK-Clip does not clip plain: QK-norm" in str(w.message) for w in caught)
        assert "not clipped: QK-norm" in lines[0]
        np.testing.assert_array_equal(after, before)
    else:
        np.testing.assert_allclose(after[before > threshold], threshold, rtol=1e-5)
        np.testing.assert_allclose(after[before <= threshold], before[before <= threshold])


HUB_MODELS = {
    "Llama": dict(num_query_heads=4, num_key_value_heads=2, intermediate_dim=32),
    "Gemma": dict(num_query_heads=4, num_key_value_heads=2, intermediate_dim=32, head_dim=4),
    "GPT2": dict(num_heads=4, intermediate_dim=32, dropout=0.0, max_sequence_length=SEQUENCE),
    "Qwen3": dict(num_query_heads=4, num_key_value_heads=2, intermediate_dim=32, head_dim=4),
}


def hub_causal_lm(name):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = getattr(keras_hub.models, f"{name}Backbone")(
        vocabulary_size=VOCABULARY, num_layers=1, hidden_dim=WIDTH, **HUB_MODELS[name]
    )
    return getattr(keras_hub.models, f"{name}CausalLM")(backbone=backbone, preprocessor=None)


def hub_step(model, threshold):
    """One step without learning on a padded batch; returns the optimizer."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCABULARY, (BATCH, SEQUENCE)).astype("int32")
    padding = np.arange(SEQUENCE)[None] < rng.integers(4, SEQUENCE + 1, (BATCH, 1))
    optimizer = keras_muon.Muon(learning_rate=0.0, qk_clip_threshold=threshold)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    x = {"token_ids": tokens, "padding_mask": padding}
    model.fit(x, tokens, batch_size=BATCH, verbose=0)
    return optimizer


@pytest.mark.parametrize("name", ["Llama", "Gemma", "GPT2"])
def test_keras_hub_attention_is_clipped_to_the_threshold(name):
    keras.utils.set_random_seed(6)
    model = hub_causal_lm(name)
    (path, before), = hub_step(model, 1e9).max_logits().items()
    threshold = middle_threshold(before)
    clipping = hub_step(model, threshold)
    assert clipping.clipped_heads() == np.sum(before > threshold)
    # One layer: the clip leaves its inputs as they were.
    after = hub_step(model, 1e9).max_logits()[path]
    np.testing.assert_allclose(after[before > threshold], threshold, rtol=1e-5)
    np.testing.assert_allclose(after[before <= threshold], before[before <= threshold], rtol=1e-5)


def test_keras_hub_qk_norm_attention_is_listed_not_clipped():
    model = hub_causal_lm("Qwen3")
    optimizer = keras_muon.Muon(qk_clip_threshold=10.0)
    optimizer.attach(model)
    with pytest.warns(UserWarning, match="QK-Clip does not clip .*QK-norm"):
        optimizer.build(model.trainable_variables)
    lines = []
    optimizer.summary(print_fn=lines.append)
    assert "not clipped: QK-norm" in lines[0]
    assert optimizer.max_logits() == {}
