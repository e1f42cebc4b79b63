"""QK-Clip on fused projections: the query and key columns of each head of
one `[q | k | v]` kernel (part-major or head-major) are scaled, and
nothing else."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon import FusedLayout
from keras_muon.qk_clip.rules import ATTENTION_RULES
from tests import reference

D, HEADS, HEAD_DIM, T = 8, 4, 2, 5


class FusedAttention(keras.layers.Layer):
    """Self-attention through one fused projection `qkv`, part-major
    (`Dense (d, 3d)`) or head-major (`EinsumDense (d, heads, 3·head_dim)`)."""

    def __init__(self, order, **kwargs):
        super().__init__(**kwargs)
        self.order = order
        if order == "part_major":
            self.qkv = keras.layers.Dense(3 * D, use_bias=True)
        else:
            self.qkv = keras.layers.EinsumDense(
                "btd,dhe->bthe", (None, HEADS, 3 * HEAD_DIM), bias_axes="he"
            )

    def split(self, x):
        y = self.qkv(x)
        if self.order == "part_major":
            return [
                ops.reshape(y[..., i * D : (i + 1) * D], (-1, T, HEADS, HEAD_DIM)) for i in range(3)
            ]
        return [y[..., i * HEAD_DIM : (i + 1) * HEAD_DIM] for i in range(3)]

    def attend(self, query, key, value, attention_mask=None):
        logits = ops.einsum("bthd,bshd->bhts", query, key) / np.sqrt(HEAD_DIM)
        return ops.einsum("bhts,bshd->bthd", ops.softmax(logits, axis=-1), value)

    def call(self, x):
        return ops.reshape(self.attend(*self.split(x)), (-1, T, D))


def layout_of(layer):
    return FusedLayout.equal("qkv", heads=HEADS, order=layer.order)


def rule(layer):
    layout = layout_of(layer)
    return keras_muon.AttentionSpec(
        query=keras_muon.ProjectionPart(layer.qkv, layout, "q"),
        key=keras_muon.ProjectionPart(layer.qkv, layout, "k"),
        scale=1 / np.sqrt(HEAD_DIM),
        method="attend",
    )


def head_logits(layer, x):
    q, k, _ = (ops.convert_to_numpy(t) for t in layer.split(ops.convert_to_tensor(x)))
    return reference.head_max_logits(q, k, 1 / np.sqrt(HEAD_DIM))


@pytest.mark.parametrize("order", ["part_major", "head_major"])
def test_each_heads_query_and_key_columns_are_clipped_and_nothing_else(order):
    keras.utils.set_random_seed(0)
    with ATTENTION_RULES.scoped():
        keras_muon.register_attention_rule(FusedAttention, rule)
        x = keras.Input((T, D))
        attention = FusedAttention(order)
        model = keras.Model(x, keras.layers.Dense(2)(attention(x)))
        inputs = np.random.default_rng(0).normal(size=(4, T, D)).astype("float32") * 3
        targets = np.zeros((4, T, 2), "float32")
        before = head_logits(attention, inputs)
        threshold = float(np.sort(before)[1:-1].mean())  # heads on both sides
        clipped = before > threshold
        optimizer = keras_muon.Muon(learning_rate=0.0, qk_clip_threshold=threshold)
        model.compile(optimizer=optimizer, loss="mse")
        kernel, bias = (ops.convert_to_numpy(v) for v in (attention.qkv.kernel, attention.qkv.bias))
        model.fit(inputs, targets, batch_size=4, epochs=1, verbose=0)

    np.testing.assert_allclose(optimizer.max_logits()[attention.path], before, rtol=1e-5)
    after = head_logits(attention, inputs)
    np.testing.assert_allclose(after[clipped], threshold, rtol=1e-5)
    np.testing.assert_allclose(after[~clipped], before[~clipped], rtol=1e-6)
    # Each head's q and k by sqrt(γ) (α = 0.5), v and the other heads by 1.
    gamma = np.where(clipped, threshold / before, 1.0)
    factors = np.ones((3, HEADS))
    factors[:2] = np.sqrt(gamma)
    if order == "part_major":  # columns (part, head, head_dim)
        columns = np.repeat(factors, HEAD_DIM, axis=1).reshape(-1)
    else:  # kernel (d, head, part·head_dim)
        columns = np.repeat(factors.T, HEAD_DIM, axis=1)
    for name, old, factor in (("kernel", kernel, columns), ("bias", bias, columns)):
        new = ops.convert_to_numpy(getattr(attention.qkv, name))
        np.testing.assert_allclose(new, old * factor, rtol=1e-6, err_msg=name)


def test_a_part_the_layout_does_not_have_is_not_clipped_and_says_why():
    def wrong(layer):
        layout = layout_of(layer)
        return keras_muon.AttentionSpec(
            query=keras_muon.ProjectionPart(layer.qkv, layout, "query"),
            key=keras_muon.ProjectionPart(layer.qkv, layout, "k"),
            scale=1.0,
            method="attend",
        )

    with ATTENTION_RULES.scoped():
        keras_muon.register_attention_rule(FusedAttention, wrong)
        x = keras.Input((T, D))
        model = keras.Model(x, keras.layers.Dense(2)(FusedAttention("part_major")(x)))
        optimizer = keras_muon.Muon(qk_clip_threshold=1.0)
        model.compile(optimizer=optimizer, loss="mse")
        optimizer.build(model.trainable_variables)
        text = []
        optimizer.summary(print_fn=text.append)
    assert "not clipped: no heads of a part 'query'" in text[0]
