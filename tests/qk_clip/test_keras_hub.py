"""QK-Clip on keras-hub's attention layers."""

import keras
import numpy as np
import pytest

import keras_muon
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
