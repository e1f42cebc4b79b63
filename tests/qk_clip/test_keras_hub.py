"""QK-Clip on keras-hub's attention layers."""

import keras
import numpy as np
import pytest

import keras_muon
from keras_muon.qk_clip.keras_hub import KERAS_HUB_RULES
from keras_muon.registry import installed_classes
from tests.qk_clip.attention import BATCH
from tests.qk_clip.attention import SEQUENCE
from tests.qk_clip.attention import VOCABULARY
from tests.qk_clip.attention import WIDTH
from tests.qk_clip.attention import middle_threshold

HUB_MODELS = {
    "Llama": dict(num_query_heads=4, num_key_value_heads=2, intermediate_dim=32),
    "Gemma": dict(num_query_heads=4, num_key_value_heads=2, intermediate_dim=32, head_dim=4),
    "GPT2": dict(num_heads=4, intermediate_dim=32, dropout=0.0, max_sequence_length=SEQUENCE),
    "Qwen3": dict(num_query_heads=4, num_key_value_heads=2, intermediate_dim=32, head_dim=4),
    # q, k and v of each head side by side in one fused kernel.
    "GPTNeoX": dict(
        num_heads=4, intermediate_dim=32, max_sequence_length=SEQUENCE, rotary_percentage=0.5
    ),
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


@pytest.mark.parametrize("name", ["Llama", "Gemma", "GPT2", "GPTNeoX"])
def test_keras_hub_attention_is_clipped_to_the_threshold(name):
    keras.utils.set_random_seed(6)
    model = hub_causal_lm(name)
    ((path, before),) = hub_step(model, 1e9).max_logits().items()
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


def test_every_keras_hub_attention_rule_names_an_installed_class():
    pytest.importorskip("keras_hub")
    assert len(installed_classes(KERAS_HUB_RULES)) == len(KERAS_HUB_RULES)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("WindowAttention", "relative-position term"),
        ("MultiHeadAttentionWithRelativePE", "relative-position term"),
        ("Qwen3_5VisionAttention", "inside `call`"),
        ("Attention2d", "inside `call`"),
        ("SingleStreamBlock", "QK-norm"),
        ("Qwen3_5Attention", "QK-norm"),
        ("Qwen3_5GatedDeltaNet", "linear attention"),
    ],
)
def test_attention_that_cannot_be_clipped_is_listed_with_the_reason(name, reason):
    ((_, rule),) = [(key, r) for key, r in KERAS_HUB_RULES.items() if key[1] == name]
    assert reason in rule(None)


def mmdit_step(model, threshold):
    """One step without learning of `model` (an SD3 joint-attention block);
    returns the optimizer."""
    rng = np.random.default_rng(0)
    x, context, time = (rng.normal(size=s).astype("float32") for s in SD3_SHAPES)
    optimizer = keras_muon.Muon(learning_rate=0.0, qk_clip_threshold=threshold)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit([x, context, time], np.zeros((BATCH, 1), "float32"), batch_size=BATCH, verbose=0)
    return optimizer


SD3_SHAPES = ((BATCH, 6, WIDTH), (BATCH, 4, WIDTH), (BATCH, WIDTH))


def test_sd3_joint_attention_is_clipped_through_both_streams_fused_kernels():
    pytest.importorskip("keras_hub")
    from keras_hub.src.models.stable_diffusion_3.mmdit import MMDiTBlock

    keras.utils.set_random_seed(3)
    inputs = [keras.Input(shape[1:]) for shape in SD3_SHAPES]
    x, context = MMDiTBlock(num_heads=4, hidden_dim=WIDTH, name="joint")(*inputs)
    pooled = keras.layers.Concatenate()(
        [keras.ops.mean(x, axis=1), keras.ops.mean(context, axis=1)]
    )
    model = keras.Model(inputs, keras.layers.Dense(1)(pooled))
    ((path, before),) = mmdit_step(model, 1e9).max_logits().items()
    assert path == "joint"
    threshold = middle_threshold(before)
    assert mmdit_step(model, threshold).clipped_heads() == np.sum(before > threshold)
    # q and k of every head, in both streams' kernels: the joint logits of
    # a clipped head are at the threshold, the others as they were.
    after = mmdit_step(model, 1e9).max_logits()[path]
    np.testing.assert_allclose(after[before > threshold], threshold, rtol=1e-5)
    np.testing.assert_allclose(after[before <= threshold], before[before <= threshold], rtol=1e-5)
