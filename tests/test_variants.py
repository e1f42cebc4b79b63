"""NorMuon, AdaMuon and cautious weight decay against the float64 reference."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon import coefficient_schedule
from tests import reference
from tests.test_optimizer import ATOL
from tests.test_optimizer import SHAPES
from tests.test_optimizer import random_arrays
from tests.test_optimizer import run
from tests.test_optimizer import small_classifier

SCHEDULE = coefficient_schedule("polar_express", 5)
LEARNING_RATE = 0.02

# name: (optimizer class, its arguments, the reference's arguments)
VARIANTS = {
    "Muon cautious": (keras_muon.Muon, {"cautious_weight_decay": True}, {"rule": "muon", "cautious": True}),
    "NorMuon longer": (keras_muon.NorMuon, {}, {"rule": "normuon", "neuron_axis": "longer"}),
    "NorMuon output": (keras_muon.NorMuon, {"neuron_axis": "output"}, {"rule": "normuon", "neuron_axis": "output"}),
    "NorMuon beta_2 0.8": (keras_muon.NorMuon, {"beta_2": 0.8}, {"rule": "normuon", "beta_2": 0.8}),
    "AdaMuon": (keras_muon.AdaMuon, {}, {"rule": "adamuon", "beta_2": 0.95}),
    "AdaMuon without sign": (keras_muon.AdaMuon, {"sign_input": False}, {"rule": "adamuon", "beta_2": 0.95, "sign_input": False}),
    "AdaMuon beta_2 0.9 rms 0.3": (keras_muon.AdaMuon, {"beta_2": 0.9, "rms_rate": 0.3},
                                   {"rule": "adamuon", "beta_2": 0.9, "rms_rate": 0.3}),
}


def family_reference(initial, gradients, *, rule, nesterov=True, weight_decay=0.1,
                     neuron_axis="longer", cautious=False, **options):
    """The reference on 2-D kernels read as (d_in, d_out) = shape."""
    finals = []
    for i, w in enumerate(initial):
        w = w.astype(np.float64)[None]
        m = np.zeros_like(w)
        d_in, d_out = w.shape[1:]
        if rule == "normuon":
            state = np.zeros((1, *reference.normuon_second_moment_shape(d_in, d_out, neuron_axis)))
        else:
            state = np.zeros_like(w)
        for step in gradients:
            w, m, state = reference.muon_family_step(
                w, m, state, step[i].astype(np.float64)[None], rule=rule, lr=LEARNING_RATE,
                momentum=0.95, nesterov=nesterov, weight_decay=weight_decay, schedule=SCHEDULE,
                scale=reference.scale("moonlight", d_in, d_out), cautious=cautious, **options,
            )
        finals.append(w[0])
    return finals


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("cautious", [False, True])
def test_variants_match_reference(variant, nesterov, steps, cautious):
    optimizer_type, arguments, reference_arguments = VARIANTS[variant]
    arguments = dict(arguments, cautious_weight_decay=cautious or arguments.get("cautious_weight_decay", False))
    reference_arguments = dict(reference_arguments, cautious=cautious or reference_arguments.get("cautious", False))
    # Both orientations; weights of the size of their update, so that the
    # cautious mask has entries of both signs.
    initial = random_arrays(SHAPES.values(), seed=steps, scale=0.05)
    gradients = [random_arrays(SHAPES.values(), seed=10 + t) for t in range(steps)]
    optimizer = optimizer_type(learning_rate=LEARNING_RATE, nesterov=nesterov, weight_decay=0.1, **arguments)
    got = run(optimizer, initial, gradients)
    expected = family_reference(initial, gradients, nesterov=nesterov, **reference_arguments)
    for g, e, shape in zip(got, expected, SHAPES):
        np.testing.assert_allclose(g, e, atol=ATOL, err_msg=shape)


def test_cautious_weight_decay_decays_only_where_the_update_agrees():
    # One step from a zero momentum: Muon's update has the sign of msign(G).
    w = np.array([[1.0, -1.0], [1.0, -1.0]], "float32")
    g = np.array([[1.0, 1.0], [-1.0, -1.0]], "float32")  # msign: diag(1,-1)-like signs
    plain = run(keras_muon.Muon(learning_rate=0.1, weight_decay=0.5, nesterov=False), [w], [[g]])[0]
    cautious = run(
        keras_muon.Muon(learning_rate=0.1, weight_decay=0.5, nesterov=False, cautious_weight_decay=True),
        [w], [[g]],
    )[0]
    undecayed = run(keras_muon.Muon(learning_rate=0.1, weight_decay=0.0, nesterov=False), [w], [[g]])[0]
    update_sign = np.sign(w - undecayed)  # the sign of lr·s·O
    agrees = update_sign * w >= 0
    assert agrees.any() and not agrees.all()
    np.testing.assert_allclose(cautious[agrees], plain[agrees], atol=1e-6)
    np.testing.assert_allclose(cautious[~agrees], undecayed[~agrees], atol=1e-6)


def test_cautious_weight_decay_on_the_adamw_side():
    rng = np.random.default_rng(3)
    bias = rng.normal(size=(7,)).astype("float32")
    grads = [rng.normal(size=(7,)).astype("float32") for _ in range(3)]
    optimizer = keras_muon.Muon(learning_rate=0.01, adam_weight_decay=0.5, cautious_weight_decay=True)
    got = run(optimizer, [bias], [[g] for g in grads], names=["bias"])[0]
    w, m, v = bias.astype(np.float64), np.zeros(7), np.zeros(7)
    for step, g in enumerate(grads, start=1):
        w, m, v = reference.adamw_step(
            w, m, v, g.astype(np.float64), step=step, lr=0.01, beta_1=0.9, beta_2=0.999,
            epsilon=1e-7, weight_decay=0.5, cautious=True,
        )
    np.testing.assert_allclose(got, w, atol=ATOL)


@pytest.mark.parametrize("neuron_axis, shapes", [
    ("longer", {(24, 40): (1, 1, 40), (40, 24): (1, 40, 1), (16, 16): (1, 1, 16)}),
    ("output", {(24, 40): (1, 1, 40), (40, 24): (1, 1, 24), (16, 16): (1, 1, 16)}),
])
def test_normuon_state_is_one_vector_per_block(neuron_axis, shapes):
    variables = [keras.Variable(np.ones(shape, "float32"), name="kernel") for shape in shapes]
    optimizer = keras_muon.NorMuon(neuron_axis=neuron_axis)
    optimizer.build(variables)
    got = [tuple(state.shape) for state in optimizer._block_states]
    assert got == list(shapes.values())
    assert all(state.dtype == "float32" for state in optimizer._block_states)


def test_normuon_statistic_is_per_block_of_a_conv_view():
    # A grouped conv: 2 blocks of (3·3·2, 3); the state is one (1, 3) row
    # per group, over the flattened (kh·kw·c_in, c_out) view.
    images = keras.Input((6, 6, 4))
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Conv2D(6, 3, groups=2, name="conv")(images))
    model = keras.Model(images, outputs)
    optimizer = keras_muon.NorMuon(neuron_axis="output")
    optimizer.attach(model)
    optimizer.build(model.trainable_variables)
    index = [v.path for v in model.trainable_variables].index("conv/kernel")
    assert tuple(optimizer._block_states[index].shape) == (2, 1, 3)


@pytest.mark.parametrize("optimizer_type", [keras_muon.NorMuon, keras_muon.AdaMuon])
def test_zero_gradients_and_zero_rows_stay_finite(optimizer_type):
    w = np.random.default_rng(0).normal(size=(6, 10)).astype("float32")
    g = np.random.default_rng(1).normal(size=(6, 10)).astype("float32")
    g[2] = 0.0  # one input row without gradient
    steps = [[np.zeros_like(w)], [g], [g]]
    optimizer = optimizer_type(learning_rate=0.1, weight_decay=0.0)
    history = [w]
    variable = keras.Variable(w, name="kernel")
    for (gradient,) in steps:
        optimizer.apply([ops.convert_to_tensor(gradient)], [variable])
        history.append(ops.convert_to_numpy(variable))
    assert all(np.isfinite(h).all() for h in history)
    np.testing.assert_array_equal(history[1], w)  # a zero gradient moves nothing
    assert not np.allclose(history[-1], w)


@pytest.mark.parametrize("rms_rate", [0.2, 0.05])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (7, 7)])
def test_adamuon_update_rms_is_rms_rate(rms_rate, shape):
    w = np.random.default_rng(0).normal(size=shape).astype("float32")
    grads = random_arrays([shape] * 3, seed=4)
    variable = keras.Variable(w, name="kernel")
    optimizer = keras_muon.AdaMuon(learning_rate=1.0, weight_decay=0.0, rms_rate=rms_rate)
    before = w
    for g in grads:
        optimizer.apply([ops.convert_to_tensor(g)], [variable])
        after = ops.convert_to_numpy(variable)
        assert np.sqrt(np.mean((before - after) ** 2)) == pytest.approx(rms_rate, abs=1e-6)
        before = after


def test_adamuon_state_is_the_size_of_the_variable():
    variables = [keras.Variable(np.ones((24, 40), "float32"), name="kernel")]
    optimizer = keras_muon.AdaMuon()
    optimizer.build(variables)
    sizes = [int(np.prod(v.shape)) for v in optimizer.variables if "second_moment" in v.path]
    assert sizes == [24 * 40]


@pytest.mark.parametrize(
    "optimizer_type, kwargs, message",
    [
        (keras_muon.NorMuon, {"neuron_axis": "input"}, "neuron_axis"),
        (keras_muon.NorMuon, {"beta_2": 1.0}, "beta_2"),
        (keras_muon.AdaMuon, {"scale": "jordan"}, "scale"),
        (keras_muon.AdaMuon, {"rms_rate": None}, "rms_rate"),
        (keras_muon.AdaMuon, {"sign_input": 1}, "sign_input"),
        (keras_muon.Muon, {"cautious_weight_decay": "yes"}, "cautious_weight_decay"),
    ],
)
def test_invalid_arguments_name_the_argument(optimizer_type, kwargs, message):
    with pytest.raises(ValueError, match=message):
        optimizer_type(**kwargs)


@pytest.mark.parametrize("optimizer_type, kwargs", [
    (keras_muon.NorMuon, {"beta_2": 0.9, "neuron_axis": "output", "cautious_weight_decay": True}),
    (keras_muon.AdaMuon, {"beta_2": 0.9, "sign_input": False, "rms_rate": 0.3}),
])
def test_config_round_trip(optimizer_type, kwargs):
    optimizer = optimizer_type(learning_rate=0.01, **kwargs)
    config = optimizer.get_config()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is optimizer_type
    assert restored.get_config() == config
    for name, value in kwargs.items():
        assert config[name] == value


@pytest.mark.parametrize("saved_type, loading_type", [
    (keras_muon.NorMuon, keras_muon.AdaMuon),
    (keras_muon.AdaMuon, keras_muon.NorMuon),
    (keras_muon.Muon, keras_muon.NorMuon),
    (keras_muon.NorMuon, keras_muon.Muon),
])
def test_the_state_of_one_class_is_refused_by_another(tmp_path, saved_type, loading_type):
    def compiled_model(optimizer_type):
        keras.utils.set_random_seed(0)
        model = small_classifier()
        model.compile(optimizer=optimizer_type(), loss="mse")
        model.optimizer.build(model.trainable_variables)
        return model

    compiled_model(saved_type).save(tmp_path / "model.keras")
    with pytest.raises(ValueError, match=f"saved by {saved_type.__name__},.* Use {saved_type.__name__} to resume"):
        compiled_model(loading_type).load_weights(tmp_path / "model.keras")
