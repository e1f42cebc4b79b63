"""Recording the largest logit of each head in the forward pass."""

import numpy as np
from keras import ops

import keras_muon
from keras_muon.qk_clip.probe import head_max_logits
from tests import reference
from tests.qk_clip.attention import attention_model
from tests.qk_clip.attention import batch
from tests.qk_clip.attention import fit_one_step


def test_head_max_logits_match_the_reference_with_groups_and_masks():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(3, 5, 6, 4)).astype("float32")
    key = rng.normal(size=(3, 7, 2, 4)).astype("float32")
    mask = rng.random((3, 5, 7)) < 0.5
    mask[:, :, 0] = True
    for m in (None, mask):
        expected = reference.head_max_logits(query, key, 0.5, m)
        actual = head_max_logits(
            ops.convert_to_tensor(query),
            ops.convert_to_tensor(key),
            0.5,
            None if m is None else ops.convert_to_tensor(m),
        )
        np.testing.assert_allclose(ops.convert_to_numpy(actual), expected, rtol=1e-5)


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
