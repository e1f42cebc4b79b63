"""AdaMuon: its update RMS, its state, its arguments."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from tests.helpers import check_config_round_trip
from tests.helpers import check_family_member
from tests.helpers import check_zero_gradients_and_zero_rows_stay_finite
from tests.helpers import random_arrays

# name: (class, its arguments, the reference's arguments)
VARIANTS = {
    "as published": (keras_muon.AdaMuon, {}, {"rule": "adamuon", "beta_2": 0.95}),
    "without sign": (
        keras_muon.AdaMuon,
        {"sign_input": False},
        {"rule": "adamuon", "beta_2": 0.95, "sign_input": False},
    ),
    "beta_2 0.9, rms 0.3": (
        keras_muon.AdaMuon,
        {"beta_2": 0.9, "rms_rate": 0.3},
        {"rule": "adamuon", "beta_2": 0.9, "rms_rate": 0.3},
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("cautious", [False, True])
def test_adamuon_matches_the_reference(variant, nesterov, steps, cautious):
    check_family_member(*VARIANTS[variant], nesterov, steps, cautious)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("steps", [1, 4])
def test_adamuon_with_hyperball_matches_the_reference(variant, steps):
    check_family_member(*VARIANTS[variant], nesterov=True, steps=steps, hyperball=True)


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


def test_zero_gradients_and_zero_rows_stay_finite():
    check_zero_gradients_and_zero_rows_stay_finite(keras_muon.AdaMuon)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale": "jordan"}, "scale"),
        ({"rms_rate": None}, "rms_rate"),
        ({"sign_input": 1}, "sign_input"),
        ({"beta_2": -0.5}, "beta_2"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_muon.AdaMuon(**kwargs)


def test_config_round_trip():
    config = check_config_round_trip(keras_muon.AdaMuon, beta_2=0.9, sign_input=False, rms_rate=0.3)
    assert "scale" not in config
