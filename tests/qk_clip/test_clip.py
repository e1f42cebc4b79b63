"""The clip: heads above the threshold are rescaled to it, the others
get the unclipped update."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon.qk_clip.clip import clip_factors
from tests import reference
from tests.qk_clip.attention import attention_model
from tests.qk_clip.attention import batch
from tests.qk_clip.attention import fit_one_step
from tests.qk_clip.attention import head_logits
from tests.qk_clip.attention import kernel_slices
from tests.qk_clip.attention import middle_threshold
from tests.qk_clip.attention import without_learning


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
    actual = clip_factors(ops.convert_to_tensor(logits), 10.0, 0.3, group)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(ops.convert_to_numpy(a), e, rtol=1e-6)
    # Every head's logits are scaled by exactly its own γ.
    query, key = expected
    np.testing.assert_allclose(
        query * np.repeat(key, group), np.minimum(1, 10.0 / logits), rtol=1e-6
    )


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


@pytest.mark.parametrize(
    "optimizer_type", [keras_muon.Muon, keras_muon.NorMuon, keras_muon.AdaMuon]
)
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
