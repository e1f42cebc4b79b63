"""NorMuon: its state, its arguments."""

import keras
import numpy as np
import pytest

import keras_muon
from tests.helpers import check_config_round_trip
from tests.helpers import check_family_member
from tests.helpers import check_zero_gradients_and_zero_rows_stay_finite

# name: (class, its arguments, the reference's arguments)
VARIANTS = {
    "longer": (keras_muon.NorMuon, {}, {"rule": "normuon", "neuron_axis": "longer"}),
    "output": (
        keras_muon.NorMuon,
        {"neuron_axis": "output"},
        {"rule": "normuon", "neuron_axis": "output"},
    ),
    "beta_2 0.8": (keras_muon.NorMuon, {"beta_2": 0.8}, {"rule": "normuon", "beta_2": 0.8}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("cautious", [False, True])
def test_normuon_matches_the_reference(variant, nesterov, steps, cautious):
    check_family_member(*VARIANTS[variant], nesterov, steps, cautious)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("steps", [1, 4])
def test_normuon_with_hyperball_matches_the_reference(variant, steps):
    check_family_member(*VARIANTS[variant], nesterov=True, steps=steps, hyperball=True)


@pytest.mark.parametrize(
    "neuron_axis, shapes",
    [
        ("longer", {(24, 40): (1, 1, 40), (40, 24): (1, 40, 1), (16, 16): (1, 1, 16)}),
        ("output", {(24, 40): (1, 1, 40), (40, 24): (1, 1, 24), (16, 16): (1, 1, 16)}),
    ],
)
def test_normuon_state_is_one_vector_per_block(neuron_axis, shapes):
    variables = [keras.Variable(np.ones(shape, "float32"), name="kernel") for shape in shapes]
    optimizer = keras_muon.NorMuon(neuron_axis=neuron_axis)
    optimizer.build(variables)
    got = [tuple(state.shape) for state in variant_states(optimizer)]
    assert got == list(shapes.values())
    assert all(state.dtype == "float32" for state in variant_states(optimizer))


def test_normuon_statistic_is_per_block_of_a_conv_view():
    # A grouped conv: 2 blocks of (3·3·2, 3); the state is one (1, 3) row
    # per group, over the flattened (kh·kw·c_in, c_out) view.
    images = keras.Input((6, 6, 4))
    outputs = keras.layers.Dense(2, name="head")(
        keras.layers.Conv2D(6, 3, groups=2, name="conv")(images)
    )
    model = keras.Model(images, outputs)
    optimizer = keras_muon.NorMuon(neuron_axis="output")
    optimizer.attach(model)
    optimizer.build(model.trainable_variables)
    index = [v.path for v in model.trainable_variables].index("conv/kernel")
    assert tuple(optimizer._states[index].variant_state.shape) == (2, 1, 3)


def variant_states(optimizer):
    return [state.variant_state for state in optimizer._states]


def test_zero_gradients_and_zero_rows_stay_finite():
    check_zero_gradients_and_zero_rows_stay_finite(keras_muon.NorMuon)


@pytest.mark.parametrize(
    "kwargs, message", [({"neuron_axis": "input"}, "neuron_axis"), ({"beta_2": 1.0}, "beta_2")]
)
def test_invalid_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_muon.NorMuon(**kwargs)


def test_config_round_trip():
    check_config_round_trip(
        keras_muon.NorMuon, beta_2=0.9, neuron_axis="output", cautious_weight_decay=True
    )
