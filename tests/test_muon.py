"""keras_muon.Muon: the update against the float64 reference, its
arguments, and training with Keras's features."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon import coefficient_schedule
from keras_muon.checkpoint import positional_variables
from tests import reference
from tests.helpers import ATOL
from tests.helpers import DEFAULT_WEIGHT_DECAY
from tests.helpers import SHAPES
from tests.helpers import adamw_reference
from tests.helpers import check_family_member
from tests.helpers import classifier_data
from tests.helpers import muon_reference
from tests.helpers import random_arrays
from tests.helpers import run
from tests.helpers import small_classifier


@pytest.mark.parametrize("scale", ["moonlight", "jordan", "mup", "naive"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("steps", [1, 4])
def test_muon_matches_reference(scale, nesterov, steps):
    initial = random_arrays(SHAPES.values(), seed=0)
    gradients = [random_arrays(SHAPES.values(), seed=1 + t) for t in range(steps)]
    lr = 0.02 if scale == "moonlight" else 0.005
    optimizer = keras_muon.Muon(learning_rate=lr, scale=scale, nesterov=nesterov, weight_decay=0.1)
    expected = muon_reference(
        initial, gradients, lr=lr, scale=scale, nesterov=nesterov, weight_decay=0.1
    )
    for got, want, w0 in zip(run(optimizer, initial, gradients), expected, initial):
        assert np.abs(want - w0).max() > 100 * ATOL  # the step is not trivial
        np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("coefficients", ["jordan", "you", [(3.0, -3.2, 1.2)]])
def test_muon_with_other_schedules(coefficients):
    initial = random_arrays([(16, 20)], seed=2)
    gradients = [random_arrays([(16, 20)], seed=3 + t) for t in range(3)]
    optimizer = keras_muon.Muon(
        learning_rate=0.02, ns_coefficients=coefficients, ns_steps=6, momentum=0.9
    )
    expected = muon_reference(
        initial,
        gradients,
        lr=0.02,
        momentum=0.9,
        weight_decay=DEFAULT_WEIGHT_DECAY,
        schedule=coefficient_schedule(coefficients, 6),
    )
    np.testing.assert_allclose(run(optimizer, initial, gradients)[0], expected[0], atol=ATOL)


def test_adamw_route_matches_reference_and_keras_adamw():
    shapes = [(7,), (5, 6)]  # a bias and a 2-D non-kernel (layer unknown)
    names = ["bias", "embeddings"]
    initial = random_arrays(shapes, seed=4)
    gradients = [random_arrays(shapes, seed=5 + t) for t in range(3)]
    optimizer = keras_muon.Muon(
        learning_rate=0.01,
        adam_lr_ratio=0.5,
        adam_weight_decay=0.1,
        adam_beta_1=0.8,
        adam_beta_2=0.99,
        epsilon=1e-6,
    )
    got = run(optimizer, initial, gradients, names)
    keras_adamw = keras.optimizers.AdamW(
        learning_rate=0.005, weight_decay=0.1, beta_1=0.8, beta_2=0.99, epsilon=1e-6
    )
    from_keras = run(keras_adamw, initial, gradients, names)
    for i, w in enumerate(initial):
        w, m, v = w.astype(np.float64), 0.0, 0.0
        for t, step in enumerate(gradients):
            w, m, v = reference.adamw_step(
                w,
                m,
                v,
                step[i],
                step=t + 1,
                lr=0.005,
                beta_1=0.8,
                beta_2=0.99,
                epsilon=1e-6,
                weight_decay=0.1,
            )
        np.testing.assert_allclose(got[i], w, atol=1e-6)
        np.testing.assert_allclose(got[i], from_keras[i], atol=1e-6)


def test_exclude_from_weight_decay():
    initial = random_arrays([(12, 10)], seed=6)
    gradients = [random_arrays([(12, 10)], seed=7)]
    optimizer = keras_muon.Muon(learning_rate=0.02, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["kernel"])
    expected = muon_reference(initial, gradients, lr=0.02, weight_decay=0.0)
    np.testing.assert_allclose(run(optimizer, initial, gradients)[0], expected[0], atol=ATOL)


def test_each_route_decays_with_its_own_rate():
    shapes = [(12, 10), (7,), (5, 6)]
    names = ["kernel", "bias", "embeddings"]
    initial = random_arrays(shapes, seed=50)
    gradients = [random_arrays(shapes, seed=51 + t) for t in range(2)]
    optimizer = keras_muon.Muon(learning_rate=0.02, weight_decay=0.5, adam_weight_decay=0.01)
    got = run(optimizer, initial, gradients, names)
    assert [row["route"] for row in optimizer.routing_table()] == ["muon", "adamw", "adamw"]
    muon = muon_reference(initial[:1], [g[:1] for g in gradients], lr=0.02, weight_decay=0.5)
    np.testing.assert_allclose(got[0], muon[0], atol=ATOL)
    adamw = adamw_reference(initial[1:], [g[1:] for g in gradients], lr=0.02, weight_decay=0.01)
    for got_i, want in zip(got[1:], adamw):
        np.testing.assert_allclose(got_i, want, atol=1e-6)


def test_exclude_from_weight_decay_on_adamw_variables():
    shapes = [(7,), (5, 6)]
    names = ["bias", "embeddings"]
    initial = random_arrays(shapes, seed=53)
    gradients = [random_arrays(shapes, seed=54 + t) for t in range(2)]
    optimizer = keras_muon.Muon(learning_rate=0.02, adam_weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    bias, embeddings = run(optimizer, initial, gradients, names)
    assert [row["route"] for row in optimizer.routing_table()] == ["adamw", "adamw"]
    excluded = adamw_reference(initial[:1], [g[:1] for g in gradients], lr=0.02, weight_decay=0.0)
    np.testing.assert_allclose(bias, excluded[0], atol=1e-6)
    decayed = adamw_reference(initial[1:], [g[1:] for g in gradients], lr=0.02, weight_decay=0.5)
    np.testing.assert_allclose(embeddings, decayed[0], atol=1e-6)


def test_learning_rate_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.5)
    initial = random_arrays([(10, 14)], seed=8)
    gradients = [random_arrays([(10, 14)], seed=9 + t) for t in range(3)]
    optimizer = keras_muon.Muon(learning_rate=schedule, weight_decay=0.1)
    expected = muon_reference(
        initial, gradients, lr=None, weight_decay=0.1, learning_rates=[0.05, 0.025, 0.0125]
    )
    np.testing.assert_allclose(run(optimizer, initial, gradients)[0], expected[0], atol=ATOL)


@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (8, 65536)])
def test_extreme_shapes(shape):
    initial = random_arrays([shape], seed=10)
    gradients = [random_arrays([shape], seed=11)]
    optimizer = keras_muon.Muon(learning_rate=0.02)
    expected = muon_reference(initial, gradients, lr=0.02, weight_decay=DEFAULT_WEIGHT_DECAY)
    np.testing.assert_allclose(run(optimizer, initial, gradients)[0], expected[0], atol=ATOL)


@pytest.mark.parametrize("dtype, tolerance", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_low_precision_variables(dtype, tolerance):
    initial = random_arrays([(16, 24)], seed=12, scale=0.02)
    gradients = [random_arrays([(16, 24)], seed=13 + t) for t in range(2)]
    optimizer = keras_muon.Muon(learning_rate=0.05)
    got = run(optimizer, initial, gradients, dtype=dtype)[0]
    expected = muon_reference(initial, gradients, lr=0.05, weight_decay=DEFAULT_WEIGHT_DECAY)[0]
    step = expected - initial[0]
    # Relative to the size of the update: the dtype's rounding of the
    # weights and of the update.
    assert np.linalg.norm(got - expected) <= tolerance * np.linalg.norm(
        step
    ) + 1e-3 * np.linalg.norm(np.spacing(initial[0].astype(dtype).astype(np.float32)))


@pytest.mark.parametrize(
    "ns_dtype, least, tolerance", [("bfloat16", 0.01, 0.15), ("float16", 1e-3, 0.02)]
)
def test_low_precision_newton_schulz(ns_dtype, least, tolerance):
    initial = random_arrays([(16, 24)], seed=14)
    gradients = [random_arrays([(16, 24)], seed=15)]
    got = run(keras_muon.Muon(learning_rate=0.05, ns_dtype=ns_dtype), initial, gradients)[0]
    exact = run(keras_muon.Muon(learning_rate=0.05), initial, gradients)[0]
    step = exact - initial[0]
    # bfloat16: 3–10% of the update (see test_newton_schulz); float16:
    # 0.5–1%. At least `least`: the iteration is not float32's.
    error = np.linalg.norm(got - exact)
    assert least * np.linalg.norm(step) <= error <= tolerance * np.linalg.norm(step)


def test_gradient_accumulation_averages_gradients():
    initial = random_arrays([(12, 16)], seed=16)
    g1, g2 = random_arrays([(12, 16)], seed=17), random_arrays([(12, 16)], seed=18)
    optimizer = keras_muon.Muon(learning_rate=0.02, gradient_accumulation_steps=2)
    after_one = run(optimizer, initial, [g1])[0]
    np.testing.assert_array_equal(after_one, initial[0])
    got = run(
        keras_muon.Muon(learning_rate=0.02, gradient_accumulation_steps=2), initial, [g1, g2]
    )[0]
    average = [(g1[0] + g2[0]) / 2]
    expected = muon_reference(initial, [average], lr=0.02, weight_decay=DEFAULT_WEIGHT_DECAY)[0]
    np.testing.assert_allclose(got, expected, atol=ATOL)


def test_gradient_accumulation_under_fit_equals_the_larger_batch():
    # Muon kernels, and AdamW biases and head: two accumulated batches of 4
    # are one batch of 8 (the loss is a mean over the batch).
    x, y = classifier_data()

    def trained(batch_size, **options):
        keras.utils.set_random_seed(3)
        model = small_classifier()
        optimizer = keras_muon.Muon(learning_rate=0.02, **options)
        model.compile(
            optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
        assert int(optimizer.iterations) == 8
        return [ops.convert_to_numpy(w) for w in model.weights]

    accumulated = trained(4, gradient_accumulation_steps=2)
    for got, want in zip(accumulated, trained(8)):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
def test_gradient_clipping(clip):
    initial = random_arrays([(12, 16), (8, 8)], seed=19)
    gradients = [random_arrays([(12, 16), (8, 8)], seed=20)]
    got = run(keras_muon.Muon(learning_rate=0.02, **{clip: 0.5}), initial, gradients)
    g = gradients[0]
    if clip == "clipnorm":
        clipped = [x * min(1.0, 0.5 / np.linalg.norm(x)) for x in g]
    else:
        total = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g))
        clipped = [x * min(1.0, 0.5 / total) for x in g]
    # msign forgets the gradient's scale, but the momentum of later steps
    # would not: check against the reference on the clipped gradients.
    expected = muon_reference(initial, [clipped], lr=0.02, weight_decay=DEFAULT_WEIGHT_DECAY)
    for got_i, want in zip(got, expected):
        np.testing.assert_allclose(got_i, want, atol=ATOL)
    # And the clipped momentum is what the optimizer stored.
    optimizer = keras_muon.Muon(learning_rate=0.02, **{clip: 0.5})
    run(optimizer, initial, gradients)
    momentum = ops.convert_to_numpy(optimizer._states[0].momentum)
    np.testing.assert_allclose(momentum, clipped[0], rtol=1e-5)


def test_non_finite_gradients():
    initial = random_arrays([(6, 8), (6, 8)], seed=21)
    gradients = random_arrays([(6, 8), (6, 8)], seed=22)
    for g in gradients:
        g[2, 3] = np.nan
    muon_kernel, adamw_weight = run(keras_muon.Muon(), initial, [gradients], ["kernel", "table"])
    # msign mixes every entry of a matrix: the whole kernel becomes NaN.
    assert np.isnan(muon_kernel).all()
    # AdamW is elementwise, like keras.optimizers.AdamW.
    keras_adamw = run(keras.optimizers.AdamW(), initial, [gradients], ["kernel", "table"])[1]
    np.testing.assert_array_equal(np.isnan(adamw_weight), np.isnan(keras_adamw))
    assert np.isnan(adamw_weight).sum() == 1


def test_loss_scale_optimizer_skips_non_finite_steps(dtype_policy):
    dtype_policy("mixed_float16")
    model = keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(2)])
    model.compile(optimizer=keras_muon.Muon(learning_rate=0.02), loss="mse")
    x = np.ones((4, 3), "float32")
    model.fit(x, np.zeros((4, 2)), verbose=0)  # builds everything
    before = [ops.convert_to_numpy(w) for w in model.weights]
    model.fit(x, np.full((4, 2), np.inf), verbose=0)
    for got, want in zip(model.weights, before):
        np.testing.assert_array_equal(ops.convert_to_numpy(got), want)
    model.fit(x, np.ones((4, 2)), verbose=0)
    after = [ops.convert_to_numpy(w) for w in model.weights]
    assert all(np.isfinite(w).all() for w in after)
    assert not np.allclose(after[0], before[0])


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fit(policy, dtype_policy):
    dtype_policy(policy)
    model = small_classifier()
    optimizer = keras_muon.Muon(learning_rate=0.01)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = classifier_data()
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    routes = {row["path"]: row["route"] for row in optimizer.routing_table()}
    assert routes["hidden/kernel"] == "muon" and routes["head/kernel"] == "adamw"


def test_ema_fit():
    plain = fit_weights(jit_compile="auto", epochs=2)
    averaged = fit_weights(jit_compile="auto", epochs=2, use_ema=True, ema_momentum=0.5)
    # fit ends by copying the moving averages into the model: they lag the
    # plain run's weights, which keras_muon produced identically.
    assert any(np.abs(a - p).max() > 1e-4 for a, p in zip(averaged, plain))


def fit_weights(jit_compile, epochs=2, seed=0, **optimizer_kwargs):
    keras.utils.set_random_seed(seed)
    model = small_classifier()
    model.compile(
        optimizer=keras_muon.Muon(learning_rate=0.01, **optimizer_kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    x, y = classifier_data()
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return [ops.convert_to_numpy(v) for v in model.weights]


def test_compiled_and_eager_training_agree():
    # jit_compile=True: XLA on TensorFlow and JAX, torch.compile on torch.
    for compiled, eager in zip(fit_weights(True), fit_weights(False)):
        np.testing.assert_allclose(compiled, eager, atol=1e-5)


def test_config_round_trip():
    optimizer = keras_muon.Muon(
        learning_rate=keras.optimizers.schedules.CosineDecay(0.02, 100),
        momentum=0.9,
        nesterov=False,
        weight_decay=0.1,
        scale="moonlight",
        rms_rate=0.3,
        ns_steps=6,
        ns_coefficients=[(3.0, -3.2, 1.2)],
        ns_dtype="bfloat16",
        per_head=True,
        exclude_layers=["head"],
        adam_beta_1=0.8,
        adam_beta_2=0.95,
        epsilon=1e-8,
        adam_weight_decay=0.01,
        adam_lr_ratio=0.5,
        global_clipnorm=1.0,
        gradient_accumulation_steps=2,
        name="muon_test",
    )
    config = optimizer.get_config()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is keras_muon.Muon
    assert restored.get_config() == config
    assert config["ns_coefficients"] == [[3.0, -3.2, 1.2]] * 6
    assert keras.saving.get_registered_name(keras_muon.Muon) == "keras_muon>Muon"


def test_defaults_match_keras_muon_where_shared_except_the_measured_ones():
    ours = keras_muon.Muon().get_config()
    theirs = keras.optimizers.Muon().get_config()
    shared = set(ours) & set(theirs) - {"name"}
    assert {"learning_rate", "weight_decay", "momentum", "ns_steps", "rms_rate"} <= shared
    # Chosen from benchmarks/quality.py and the examples (README, "Defaults").
    measured = {"learning_rate": 0.003, "weight_decay": DEFAULT_WEIGHT_DECAY}
    for key in shared - set(measured):
        assert ours[key] == theirs[key], key
    for key, value in measured.items():
        assert ours[key] == pytest.approx(value), key


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"scale": "foo"}, "scale"),
        ({"ns_steps": 0}, "ns_steps"),
        ({"momentum": 1.5}, "momentum"),
        ({"momentum": 1.0}, "momentum"),
        ({"ns_coefficients": [(1.0, 2.0)]}, "ns_coefficients"),
        ({"ns_coefficients": "fast"}, "ns_coefficients"),
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"adam_weight_decay": -1.0}, "adam_weight_decay"),
        ({"adam_lr_ratio": -1.0}, "adam_lr_ratio"),
        ({"rms_rate": 0.0}, "rms_rate"),
        ({"adam_beta_1": 1.0}, "adam_beta_1"),
        ({"adam_beta_2": -0.1}, "adam_beta_2"),
        ({"epsilon": -1e-8}, "epsilon"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"scale": "jordan", "rms_rate": 0.3}, "rms_rate"),
        ({"ns_coefficients": [(1.0, 2.0, 3.0)]}, "diverge"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"momentum": "0.9"}, "momentum"),
        ({"nesterov": "yes"}, "nesterov"),
        ({"per_head": 1}, "per_head"),
        ({"ns_dtype": "int8"}, "ns_dtype"),
        ({"exclude_layers": ["("]}, "exclude_layers"),
        ({"exclude_layers": [3]}, "exclude_layers"),
        ({"muon_a": 3.4}, "muon_a"),
        ({"cautious_weight_decay": "yes"}, "cautious_weight_decay"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        keras_muon.Muon(**kwargs)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="sparse gradients come from TensorFlow"
)
def test_sparse_gradients_are_summed_per_row_first():
    import tensorflow as tf

    initial = random_arrays([(6, 4)], seed=26)
    rows = np.array([1, 3, 1, 1])
    values = random_arrays([(4, 4)], seed=27)[0]
    dense = np.zeros((6, 4), "float32")
    np.add.at(dense, rows, values)
    optimizer = keras_muon.Muon(learning_rate=0.01)
    table = keras.Variable(initial[0], name="embeddings")
    sparse = tf.IndexedSlices(tf.constant(values), tf.constant(rows), tf.constant([6, 4]))
    optimizer.apply([sparse], [table])
    expected = run(keras_muon.Muon(learning_rate=0.01), initial, [[dense]], ["embeddings"])[0]
    np.testing.assert_allclose(ops.convert_to_numpy(table), expected, atol=1e-7)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX training loops are stateless")
def test_jitted_stateless_apply_equals_apply():
    import jax

    shapes = [(12, 16), (16,)]
    initial = random_arrays(shapes, seed=28)
    gradients = [random_arrays(shapes, seed=29 + t) for t in range(3)]
    expected = run(keras_muon.Muon(learning_rate=0.02), initial, gradients, ["kernel", "bias"])

    optimizer = keras_muon.Muon(learning_rate=0.02)
    variables = [keras.Variable(w, name=n) for w, n in zip(initial, ["kernel", "bias"])]
    optimizer.build(variables)
    step = jax.jit(optimizer.stateless_apply)
    state = [v.value for v in optimizer.variables]
    values = [v.value for v in variables]
    for grads in gradients:
        values, state = step(state, grads, values)
    for got, want in zip(values, expected):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_adamw_variables_keep_float32_moments(dtype):
    optimizer = keras_muon.Muon(learning_rate=0.01)
    bias = keras.Variable(np.full((4,), 0.5, "float32"), name="bias", dtype=dtype)
    for _ in range(3):
        optimizer.apply([ops.full((4,), 1e-4, dtype=dtype)], [bias])
    assert all(v.dtype == "float32" for v in positional_variables(optimizer)[2:])
    # AdamW moves each weight by about lr per step, whatever the gradient's size.
    moved = 0.5 - ops.convert_to_numpy(ops.cast(bias, "float32"))
    np.testing.assert_allclose(moved, 0.03, rtol=0.05)


def test_numpy_scalars_are_accepted_and_serialize_as_python_numbers():
    import json

    optimizer = keras_muon.Muon(
        learning_rate=np.float32(0.01), momentum=np.float64(0.9), ns_steps=np.int64(6)
    )
    config = optimizer.get_config()
    assert config["ns_steps"] == 6 and config["momentum"] == 0.9
    json.dumps(config)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="sparse gradients come from TensorFlow"
)
@pytest.mark.parametrize(
    "clip", [{"clipnorm": 0.05}, {"clipvalue": 0.01}, {"global_clipnorm": 0.05}]
)
def test_sparse_gradients_are_summed_before_clipping(clip):
    import tensorflow as tf

    initial = random_arrays([(6, 4)], seed=30)
    rows = np.array([1, 3, 1, 1])
    values = random_arrays([(4, 4)], seed=31)[0]
    dense = np.zeros((6, 4), "float32")
    np.add.at(dense, rows, values)
    table = keras.Variable(initial[0], name="embeddings")
    sparse = tf.IndexedSlices(tf.constant(values), tf.constant(rows), tf.constant([6, 4]))
    keras_muon.Muon(learning_rate=0.01, **clip).apply([sparse], [table])
    expected = run(keras_muon.Muon(learning_rate=0.01, **clip), initial, [[dense]], ["embeddings"])[
        0
    ]
    np.testing.assert_allclose(ops.convert_to_numpy(table), expected, atol=1e-7)


@pytest.mark.parametrize(
    "optimizer_type, rule",
    [(keras_muon.Muon, "muon"), (keras_muon.NorMuon, "normuon"), (keras_muon.AdaMuon, "adamuon")],
)
def test_layer_views_update_like_the_reference(optimizer_type, rule):
    images = keras.Input((6, 6, 4))
    x = keras.layers.Conv2D(6, 3, groups=2, name="grouped")(images)
    x = keras.layers.Conv2DTranspose(4, 2, name="transposed")(x)
    x = keras.layers.Reshape((25, 4))(x)
    x = keras.layers.MultiHeadAttention(2, 3, name="mha")(x, x)
    x = keras.layers.LSTM(5, name="lstm")(x)
    model = keras.Model(images, keras.layers.Dense(2, name="head")(x))
    optimizer = optimizer_type(learning_rate=0.02, weight_decay=0.1, per_head=True)
    optimizer.attach(model)
    rng = np.random.default_rng(32)
    grads = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
    before = {v.path: ops.convert_to_numpy(v) for v in model.trainable_variables}
    optimizer.apply([ops.convert_to_tensor(g) for g in grads], model.trainable_variables)
    gradient = {v.path: g for v, g in zip(model.trainable_variables, grads)}

    def cut(array, axis, parts):
        return np.stack(np.split(array, parts, axis=axis))

    # NumPy views written from the Keras layouts, and their inverses.
    views = {
        "grouped/kernel": (  # (3, 3, 2, 6): 2 groups of (18, 3)
            lambda k: cut(k, -1, 2).reshape(2, 18, 3),
            lambda b: np.concatenate(list(b.reshape(2, 3, 3, 2, 3)), axis=-1),
        ),
        "transposed/kernel": (  # (2, 2, 4, 6): reads 6 channels, writes 2·2·4
            lambda k: k.reshape(16, 6).T[None],
            lambda b: b[0].T.reshape(2, 2, 4, 6),
        ),
        "mha/query/kernel": (  # (4, 2, 3): per head (4, 3)
            lambda k: k.transpose(1, 0, 2),
            lambda b: b.transpose(1, 0, 2),
        ),
        "mha/attention_output/kernel": (lambda k: k, lambda b: b),  # (2, 3, 4)
        "lstm/lstm_cell/kernel": (  # (4, 20): 4 gates of (4, 5)
            lambda k: cut(k, 1, 4),
            lambda b: np.concatenate(list(b), axis=1),
        ),
        "lstm/lstm_cell/recurrent_kernel": (
            lambda k: cut(k, 1, 4),
            lambda b: np.concatenate(list(b), axis=1),
        ),
    }
    schedule = coefficient_schedule("polar_express", 5)
    for path, (to_blocks, from_blocks) in views.items():
        blocks = to_blocks(before[path].astype(np.float64))
        num_blocks, d_in, d_out = blocks.shape
        # NorMuon: one second moment per neuron of each block (per group,
        # head and gate); AdaMuon: one per entry.
        state = np.zeros_like(blocks)
        if rule == "normuon":
            state = np.zeros(
                (num_blocks, *reference.normuon_second_moment_shape(d_in, d_out, "longer"))
            )
        new_blocks, _, _ = reference.muon_family_step(
            blocks,
            np.zeros_like(blocks),
            state,
            to_blocks(gradient[path].astype(np.float64)),
            rule=rule,
            lr=0.02,
            momentum=0.95,
            nesterov=True,
            weight_decay=0.1,
            scale=reference.scale("moonlight", d_in, d_out),
            schedule=schedule,
        )
        got = ops.convert_to_numpy(next(v for v in model.trainable_variables if v.path == path))
        np.testing.assert_allclose(got, from_blocks(new_blocks), atol=ATOL, err_msg=path)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("steps", [1, 4])
def test_cautious_weight_decay_matches_the_reference(nesterov, steps):
    check_family_member(keras_muon.Muon, {}, {"rule": "muon"}, nesterov, steps, cautious=True)


def test_cautious_weight_decay_decays_only_where_the_update_agrees():
    # One step from a zero momentum: Muon's update has the sign of msign(G).
    w = np.array([[1.0, -1.0], [1.0, -1.0]], "float32")
    g = np.array([[1.0, 1.0], [-1.0, -1.0]], "float32")  # msign: diag(1,-1)-like signs
    plain = run(keras_muon.Muon(learning_rate=0.1, weight_decay=0.5, nesterov=False), [w], [[g]])[0]
    cautious = run(
        keras_muon.Muon(
            learning_rate=0.1, weight_decay=0.5, nesterov=False, cautious_weight_decay=True
        ),
        [w],
        [[g]],
    )[0]
    undecayed = run(
        keras_muon.Muon(learning_rate=0.1, weight_decay=0.0, nesterov=False), [w], [[g]]
    )[0]
    update_sign = np.sign(w - undecayed)  # the sign of lr·s·O
    agrees = update_sign * w >= 0
    assert agrees.any() and not agrees.all()
    np.testing.assert_allclose(cautious[agrees], plain[agrees], atol=1e-6)
    np.testing.assert_allclose(cautious[~agrees], undecayed[~agrees], atol=1e-6)


def test_cautious_weight_decay_on_the_adamw_side():
    rng = np.random.default_rng(3)
    bias = rng.normal(size=(7,)).astype("float32")
    grads = [rng.normal(size=(7,)).astype("float32") for _ in range(3)]
    optimizer = keras_muon.Muon(
        learning_rate=0.01, adam_weight_decay=0.5, cautious_weight_decay=True
    )
    got = run(optimizer, [bias], [[g] for g in grads], names=["bias"])[0]
    w, m, v = bias.astype(np.float64), np.zeros(7), np.zeros(7)
    for step, g in enumerate(grads, start=1):
        w, m, v = reference.adamw_step(
            w,
            m,
            v,
            g.astype(np.float64),
            step=step,
            lr=0.01,
            beta_1=0.9,
            beta_2=0.999,
            epsilon=1e-7,
            weight_decay=0.5,
            cautious=True,
        )
    np.testing.assert_allclose(got, w, atol=ATOL)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("steps", [1, 4])
def test_hyperball_matches_the_reference(nesterov, steps):
    check_family_member(keras_muon.Muon, {}, {"rule": "muon"}, nesterov, steps, hyperball=True)


def hyperball_model():
    """Attention per head (4 blocks per projection), a feed-forward pair
    (one tall kernel), an LSTM (4 gate blocks), and a head and biases on
    AdamW."""
    inputs = keras.Input((5, 8))
    x = keras.layers.MultiHeadAttention(4, 2, name="attention")(inputs, inputs)
    x = keras.layers.Dense(8, name="down")(keras.layers.Dense(24, name="up")(x))
    x = keras.layers.LSTM(6, name="lstm")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def block_norms(optimizer, model):
    """{path: the Frobenius norm of each block} of the Muon variables."""
    norms = {}
    for variable, state in zip(optimizer._trainable_variables, optimizer._states):
        if state.route.view is not None:
            blocks = ops.convert_to_numpy(state.route.view.to_blocks(variable))
            norms[variable.path] = np.linalg.norm(blocks, axis=(1, 2))
    return norms


def test_hyperball_keeps_each_block_on_its_sphere():
    keras.utils.set_random_seed(4)
    model = hyperball_model()
    optimizer = keras_muon.Muon(learning_rate=0.05, hyperball=True, per_head=True)
    optimizer.attach(model)
    optimizer.build(model.trainable_variables)
    radii = block_norms(optimizer, model)
    assert {path: len(r) for path, r in radii.items()} == {
        "attention/query/kernel": 4,
        "attention/key/kernel": 4,
        "attention/value/kernel": 4,
        "attention/attention_output/kernel": 4,
        "up/kernel": 1,
        "down/kernel": 1,
        "lstm/lstm_cell/kernel": 4,
        "lstm/lstm_cell/recurrent_kernel": 4,
    }
    saved = {
        s.radius.path: ops.convert_to_numpy(s.radius)
        for s in optimizer._states
        if s.radius is not None
    }
    assert len(saved) == len(radii)
    # Unset (0) until the first update reads the weights it trains.
    assert all(not np.any(r) for r in saved.values())
    before = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    rng = np.random.default_rng(5)
    for _ in range(3):
        grads = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
        optimizer.apply([ops.convert_to_tensor(g) for g in grads], model.trainable_variables)
    for path, norms in block_norms(optimizer, model).items():
        np.testing.assert_allclose(norms, radii[path], rtol=1e-5, err_msg=path)
    for variable, state in zip(optimizer._trainable_variables, optimizer._states):
        if state.radius is not None:
            radius = ops.convert_to_numpy(state.radius)
            np.testing.assert_allclose(radius, radii[variable.path], rtol=1e-6)
    moved = [
        not np.allclose(a, ops.convert_to_numpy(v))
        for a, v in zip(before, model.trainable_variables)
    ]
    assert all(moved)  # Muon and AdamW variables alike
    # AdamW's side keeps its weight decay; Muon's has none.
    assert optimizer.weight_decay is None and optimizer.adam_weight_decay == 0.004


def test_hyperball_steps_are_lr_relative_to_the_radius():
    # One step from a block W with update U: ‖W' − W‖ is about lr·R for a
    # small lr (a chord of the sphere), whatever the scale of W.
    for scale in (0.01, 100.0):
        w = scale * random_arrays([(12, 20)], seed=6)[0]
        optimizer = keras_muon.Muon(learning_rate=0.01, hyperball=True)
        (after,) = run(optimizer, [w], [random_arrays([(12, 20)], seed=7)])
        radius = np.linalg.norm(w)
        assert np.linalg.norm(after - w) == pytest.approx(0.01 * radius, rel=1e-3)
        assert np.linalg.norm(after) == pytest.approx(radius, rel=1e-5)


def test_hyperball_refuses_a_zero_block_naming_the_variable():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(6, kernel_initializer="zeros", name="zeroed")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    optimizer = keras_muon.Muon(hyperball=True)
    optimizer.attach(model)
    with pytest.raises(ValueError, match="zeroed/kernel has 1 of 1 blocks of norm 0"):
        optimizer.build(model.trainable_variables)


@pytest.mark.parametrize("weight_decay", [0.1, 0.5])
def test_hyperball_with_a_weight_decay_is_an_error(weight_decay):
    with pytest.raises(ValueError, match="weight_decay.*hyperball=True"):
        keras_muon.Muon(hyperball=True, weight_decay=weight_decay)
    for no_decay in (0.0, None):
        assert keras_muon.Muon(hyperball=True, weight_decay=no_decay).weight_decay is None
    config = keras_muon.Muon(hyperball=True).get_config()
    assert config["hyperball"] is True and config["weight_decay"] is None
    assert keras_muon.Muon.from_config(config).get_config() == config
    assert keras_muon.Muon().weight_decay == pytest.approx(0.1)


def test_lora_factors_start_from_a_zero_factor_without_nan():
    # enable_lora: `lora_kernel_a` random, `lora_kernel_b` zeros. In the
    # first step A's gradient is zero (B is), so A only decays; B moves by
    # an orthogonal update of RMS lr·rms_rate (the "moonlight" scale).
    inputs = keras.Input((8,))
    adapted = keras.layers.Dense(6, name="adapted")
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(adapted(inputs)))
    adapted.enable_lora(2)
    # 8 Newton–Schulz steps: singular values within 1e-5 of 1.
    optimizer = keras_muon.Muon(learning_rate=0.05, ns_steps=8)
    model.compile(optimizer=optimizer, loss="mse")
    a_before = ops.convert_to_numpy(adapted.lora_kernel_a)
    x, y = random_arrays([(16, 8), (16, 3)], seed=8)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(adapted.lora_kernel_a), a_before * (1 - 0.05 * 0.1), rtol=1e-6
    )
    b = ops.convert_to_numpy(adapted.lora_kernel_b)
    assert np.sqrt(np.mean(b**2)) == pytest.approx(0.05 * 0.2, rel=1e-4)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert all(np.isfinite(ops.convert_to_numpy(v)).all() for v in model.trainable_variables)
    assert not np.allclose(ops.convert_to_numpy(adapted.lora_kernel_a), a_before)
