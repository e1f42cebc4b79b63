"""Attention rules: registering a layer type."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon.qk_clip.rules import ATTENTION_RULES
from tests import reference
from tests.qk_clip.attention import SEQUENCE
from tests.qk_clip.attention import VOCABULARY
from tests.qk_clip.attention import WIDTH
from tests.qk_clip.attention import batch
from tests.qk_clip.attention import fit_one_step
from tests.qk_clip.attention import middle_threshold


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


@pytest.fixture
def plain_attention_registered():
    with ATTENTION_RULES.scoped():
        keras_muon.register_attention_rule(PlainAttention, plain_attention_rule)
        yield


@pytest.mark.parametrize("normalize", [False, True])
def test_a_registered_layer_is_clipped_or_listed_with_its_reason(
    normalize, plain_attention_registered
):
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
