"""Shared by the tests: small models and data, training loops, and the
reference Muon and AdamW on 2-D kernels."""

import keras
import numpy as np
from keras import ops

import keras_muon
from keras_muon import coefficient_schedule
from tests import reference

SHAPES = {"widening": (24, 40), "narrowing": (40, 24)}


def random_arrays(shapes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=shape)).astype("float32") for shape in shapes]


def run(optimizer, initial, gradients, names=None, dtype="float32"):
    """Applies each step's gradients; returns the final values as float64."""
    names = names or ["kernel"] * len(initial)
    variables = [keras.Variable(w, name=name, dtype=dtype) for w, name in zip(initial, names)]
    for step in gradients:
        optimizer.apply([ops.convert_to_tensor(g, dtype=dtype) for g in step], variables)
    return [ops.convert_to_numpy(ops.cast(v, "float32")).astype(np.float64) for v in variables]


def muon_reference(
    initial,
    gradients,
    *,
    lr,
    momentum=0.95,
    nesterov=True,
    weight_decay=0.0,
    scale="moonlight",
    rms_rate=0.2,
    schedule=None,
    learning_rates=None,
):
    """Muon on 2-D kernels read as (d_in, d_out) = shape, in float64."""
    schedule = schedule or coefficient_schedule("polar_express", 5)
    finals = []
    for i, w in enumerate(initial):
        w = w.astype(np.float64)
        m = np.zeros_like(w)
        s = reference.scale(scale, *w.shape, rms_rate=rms_rate)
        for t, step in enumerate(gradients):
            w, m = reference.muon_step(
                w,
                m,
                step[i].astype(np.float64),
                lr=learning_rates[t] if learning_rates else lr,
                momentum=momentum,
                nesterov=nesterov,
                weight_decay=weight_decay,
                scale=s,
                schedule=schedule,
            )
        finals.append(w)
    return finals


def adamw_reference(
    initial, gradients, *, lr, weight_decay, beta_1=0.9, beta_2=0.999, epsilon=1e-7
):
    """AdamW on each variable, in float64."""
    finals = []
    for i, w in enumerate(initial):
        w, m, v = w.astype(np.float64), 0.0, 0.0
        for t, step in enumerate(gradients):
            w, m, v = reference.adamw_step(
                w,
                m,
                v,
                step[i].astype(np.float64),
                step=t + 1,
                lr=lr,
                beta_1=beta_1,
                beta_2=beta_2,
                epsilon=epsilon,
                weight_decay=weight_decay,
            )
        finals.append(w)
    return finals


# float32 against float64: each step rounds at about 1e-7 relative to the
# weights (of order 1) and the iteration adds about 1e-6 relative to the
# update (of order lr·0.2).
ATOL = 2e-6
# The weight decay of Muon variables when keras_muon.Muon is given none.
DEFAULT_WEIGHT_DECAY = 0.1


def small_classifier():
    tokens = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="embed")(tokens)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    logits = keras.layers.Dense(4, name="head")(x)
    return keras.Model(tokens, logits)


def classifier_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    # Repeated tokens within a sample exercise summed sparse gradients.
    return rng.integers(0, 5, size=(n, 6)), rng.integers(0, 4, size=(n,))


def table_for(model, **kwargs):
    """{path: row} of the routing table, built the way `fit` builds it."""
    optimizer = keras_muon.Muon(**kwargs)
    model.compile(optimizer=optimizer, loss="mse")
    model.optimizer.build(model.trainable_variables)
    return {row["path"]: row for row in optimizer.routing_table()}


def routes(table):
    return {path: row["route"] for path, row in table.items()}


# The family's reference settings: Polar Express, 5 steps, lr 0.02.
FAMILY_SCHEDULE = coefficient_schedule("polar_express", 5)
FAMILY_LEARNING_RATE = 0.02


def family_reference(initial, gradients, **options):
    """The reference on 2-D kernels read as (d_in, d_out) = shape."""
    return [
        family_reference_blocks(
            w.astype(np.float64)[None],
            [step[i].astype(np.float64)[None] for step in gradients],
            **options,
        )[0]
        for i, w in enumerate(initial)
    ]


def family_reference_blocks(
    blocks,
    gradients,
    *,
    rule,
    nesterov=True,
    weight_decay=0.1,
    neuron_axis="longer",
    cautious=False,
    hyperball=False,
    **options,
):
    """The reference's steps of float64 `blocks` `(n, d_in, d_out)`, each
    block a matrix of its own, through `gradients` (each of their shape)."""
    d_in, d_out = blocks.shape[1:]
    m = np.zeros_like(blocks)
    if rule == "normuon":
        shape = reference.normuon_second_moment_shape(d_in, d_out, neuron_axis)
        state = np.zeros((len(blocks), *shape))
    else:
        state = np.zeros_like(blocks)
    radius = np.linalg.norm(blocks, axis=(-2, -1)) if hyperball else None
    for step in gradients:
        blocks, m, state = reference.muon_family_step(
            blocks,
            m,
            state,
            step,
            rule=rule,
            lr=FAMILY_LEARNING_RATE,
            momentum=0.95,
            nesterov=nesterov,
            weight_decay=weight_decay,
            schedule=FAMILY_SCHEDULE,
            scale=reference.scale("moonlight", d_in, d_out),
            cautious=cautious,
            radius=radius,
            **options,
        )
    return blocks


def check_family_member(
    optimizer_type, arguments, reference_arguments, nesterov, steps, cautious=False, hyperball=False
):
    """`optimizer_type(**arguments)` against `family_reference(**reference_arguments)`
    on both orientations, with or without Nesterov momentum, cautious
    weight decay or Hyperball, over `steps` steps."""
    arguments = dict(arguments, cautious_weight_decay=cautious)
    arguments.update({"hyperball": True} if hyperball else {"weight_decay": 0.1})
    reference_arguments = dict(reference_arguments, cautious=cautious, hyperball=hyperball)
    # Weights of the size of their update, so that the cautious mask has
    # entries of both signs.
    initial = random_arrays(SHAPES.values(), seed=steps, scale=0.05)
    gradients = [random_arrays(SHAPES.values(), seed=10 + t) for t in range(steps)]
    optimizer = optimizer_type(learning_rate=FAMILY_LEARNING_RATE, nesterov=nesterov, **arguments)
    got = run(optimizer, initial, gradients)
    expected = family_reference(initial, gradients, nesterov=nesterov, **reference_arguments)
    for g, e, shape in zip(got, expected, SHAPES):
        np.testing.assert_allclose(g, e, atol=ATOL, err_msg=shape)


def check_zero_gradients_and_zero_rows_stay_finite(optimizer_type):
    """A zero gradient moves nothing, and a row of zeros in the gradient
    (a neuron that never had one) gives no NaN."""
    w = np.random.default_rng(0).normal(size=(6, 10)).astype("float32")
    g = np.random.default_rng(1).normal(size=(6, 10)).astype("float32")
    g[2] = 0.0  # one input row without gradient
    optimizer = optimizer_type(learning_rate=0.1, weight_decay=0.0)
    history = [w]
    variable = keras.Variable(w, name="kernel")
    for gradient in [np.zeros_like(w), g, g]:
        optimizer.apply([ops.convert_to_tensor(gradient)], [variable])
        history.append(ops.convert_to_numpy(variable))
    assert all(np.isfinite(h).all() for h in history)
    np.testing.assert_array_equal(history[1], w)
    assert not np.allclose(history[-1], w)


def check_config_round_trip(optimizer_type, **kwargs):
    """`optimizer_type(**kwargs)` serialized and back gives its config,
    which holds `kwargs`."""
    optimizer = optimizer_type(learning_rate=0.01, **kwargs)
    config = optimizer.get_config()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is optimizer_type
    assert restored.get_config() == config
    for name, value in kwargs.items():
        assert config[name] == value
    return config
