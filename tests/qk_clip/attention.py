"""Attention models and training steps shared by the QK-Clip tests."""

import keras
import numpy as np
from keras import ops

import keras_muon
from tests import reference

BATCH, SEQUENCE, WIDTH, VOCABULARY = 4, 8, 16, 32


def attention_model(kind="mha", padding=False):
    """Embedding, then one attention layer named "attention" over it (so
    that its input is the embedding's output), then a Dense head."""
    tokens = keras.Input((SEQUENCE,), dtype="int32")
    inputs = [tokens]
    # Unit-scale embeddings: logits of order 1, each head's max positive.
    x = keras.layers.Embedding(
        VOCABULARY,
        WIDTH,
        embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
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
