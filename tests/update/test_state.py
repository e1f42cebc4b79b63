"""The state kept per trained variable, as the optimizer builds it."""

import keras
import numpy as np
import pytest

import keras_muon
from keras_muon.update.state import add_float32_state
from keras_muon.update.state import add_moment


def built(optimizer, variables):
    optimizer.build(variables)
    return optimizer._states


def test_each_route_gets_its_state():
    kernel = keras.Variable(np.ones((4, 6), "float32"), name="kernel")
    bias = keras.Variable(np.ones((6,), "float32"), name="bias")
    optimizer = keras_muon.Muon(scale="jordan")
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    muon, adamw = built(optimizer, [kernel, bias])
    assert muon.route.name == "muon" and adamw.route.name == "adamw"
    assert muon.momentum.shape == (4, 6) and muon.velocity is None
    assert muon.scale == pytest.approx(np.sqrt(6 / 4)) and muon.decays
    assert adamw.momentum.shape == adamw.velocity.shape == (6,)
    assert adamw.scale is None and not adamw.decays
    # Two moments for AdamW, one for Muon, after the iterations and the
    # learning rate; then the record of class, name and routes
    # (keras_muon/checkpoint.py).
    assert [v.name for v in optimizer.variables[2:]] == [
        "kernel_momentum",
        "bias_momentum",
        "bias_velocity",
        "layout",
    ]


def test_variants_keep_their_state_beside_the_momentum():
    kernel = keras.Variable(np.ones((4, 6), "float32"), name="kernel")
    (state,) = built(keras_muon.NorMuon(), [kernel])
    assert state.variant_state.shape == (1, 1, 6)
    (state,) = built(
        keras_muon.AdaMuon(), [keras.Variable(np.ones((4, 6), "float32"), name="kernel")]
    )
    assert state.variant_state.shape == (4, 6) and state.scale == pytest.approx(0.2 * np.sqrt(24))


@pytest.mark.parametrize(
    "dtype, state_dtype", [("float32", "float32"), ("bfloat16", "float32"), ("float16", "float32")]
)
def test_moments_of_16_bit_variables_are_float32(dtype, state_dtype):
    variable = keras.Variable(np.ones((3, 5), "float32"), name="kernel", dtype=dtype)
    optimizer = keras_muon.Muon()
    optimizer.build([])
    moment = add_moment(optimizer, variable, "momentum")
    assert moment.dtype == state_dtype and moment.shape == (3, 5)
    assert moment.name == "kernel_momentum"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(moment), 0.0)


def test_float32_state_is_named_after_its_variable():
    layer = keras.layers.Dense(3, name="proj")
    layer.build((None, 2))
    optimizer = keras_muon.Muon()
    optimizer.build([])
    state = add_float32_state(optimizer, layer.kernel, "second_moment", (1, 1, 3))
    assert state.path == f"{optimizer.name}/proj_kernel_second_moment"
    assert state.dtype == "float32" and state.shape == (1, 1, 3)
