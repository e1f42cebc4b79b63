"""The formulas of update/rule.py, one by one against the float64
reference (tests/reference.py)."""

import numpy as np
import pytest
from keras import ops

from keras_muon import update_scale
from keras_muon.update import rule
from tests import reference


def arrays(seed, shape=(3, 5, 7), positive=False):
    x = np.random.default_rng(seed).normal(size=shape).astype("float32")
    return np.abs(x) + 0.01 if positive else x


def numpy(x):
    return ops.convert_to_numpy(x).astype(np.float64)


@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_and_direction(nesterov):
    m, g = arrays(0), arrays(1)
    momentum, direction = rule.momentum_and_direction(
        ops.convert_to_tensor(m), ops.convert_to_tensor(g), 0.9, nesterov
    )
    expected = 0.9 * m.astype(np.float64) + g
    # float32: a few roundings of numbers of order 1.
    np.testing.assert_allclose(numpy(momentum), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        numpy(direction), 0.9 * expected + g if nesterov else expected, rtol=1e-5, atol=1e-6
    )


def test_adamw_moments_and_step_match_the_reference():
    w, m, v, g = arrays(2), arrays(3), arrays(4, positive=True), arrays(5)
    new_m, new_v = rule.adamw_moments(*map(ops.convert_to_tensor, (m, v, g)), 0.8, 0.99)
    lr, step = ops.convert_to_tensor(0.01), ops.convert_to_tensor(3.0)
    update = rule.adamw_step(new_m, new_v, lr, step, 0.8, 0.99, 1e-6)
    expected_w, expected_m, expected_v = reference.adamw_step(
        w.astype(np.float64),
        m,
        v,
        g,
        step=3,
        lr=0.01,
        beta_1=0.8,
        beta_2=0.99,
        epsilon=1e-6,
        weight_decay=0.0,
    )
    np.testing.assert_allclose(numpy(new_m), expected_m, rtol=1e-5)
    np.testing.assert_allclose(numpy(new_v), expected_v, rtol=1e-5)
    np.testing.assert_allclose(w - numpy(update), expected_w, rtol=1e-5)


@pytest.mark.parametrize("cautious", [False, True])
def test_decayed_matches_the_reference(cautious):
    w, update = arrays(6), arrays(7)
    got = numpy(
        rule.decayed(ops.convert_to_tensor(w), ops.convert_to_tensor(update), 0.1, cautious)
    )
    np.testing.assert_allclose(
        got, reference.decay(w.astype(np.float64), update, 0.1, cautious), rtol=1e-6
    )
    decayed = got != w
    if cautious:  # exactly where the update has the weight's sign
        np.testing.assert_array_equal(decayed, update * w >= 0)
    else:
        assert decayed.all()


def test_descended():
    w, update = arrays(8), arrays(9)
    got = rule.descended(ops.convert_to_tensor(w), ops.convert_to_tensor(update), 0.05)
    np.testing.assert_allclose(
        numpy(got), w - 0.05 * update.astype(np.float64), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    "neuron_axis, d_in, d_out", [("longer", 4, 6), ("longer", 6, 4), ("output", 6, 4)]
)
def test_normuon_matches_the_reference(neuron_axis, d_in, d_out):
    shape = rule.neuron_state_shape(2, d_in, d_out, neuron_axis)
    assert shape[1:] == reference.normuon_second_moment_shape(d_in, d_out, neuron_axis)
    o, v = arrays(10, (2, d_in, d_out)), arrays(11, shape, positive=True)
    got, got_v = rule.normuon(ops.convert_to_tensor(o), ops.convert_to_tensor(v), 0.9)
    axis = -2 if shape[-2] == 1 else -1
    expected_v = 0.9 * v + 0.1 * np.mean(o.astype(np.float64) ** 2, axis=axis, keepdims=True)
    expected = o / np.sqrt(expected_v)
    expected *= np.linalg.norm(o, axis=(-2, -1), keepdims=True) / np.linalg.norm(
        expected, axis=(-2, -1), keepdims=True
    )
    np.testing.assert_allclose(numpy(got_v), expected_v, rtol=1e-5)
    np.testing.assert_allclose(numpy(got), expected, rtol=1e-4, atol=1e-6)


def test_adamuon_matches_the_reference_and_has_unit_norm():
    o, v = arrays(12, (2, 5, 3)), arrays(13, (2, 5, 3), positive=True)
    got, got_v = rule.adamuon(ops.convert_to_tensor(o), ops.convert_to_tensor(v), 0.9)
    expected_v = 0.9 * v + 0.1 * o.astype(np.float64) ** 2
    expected = o / (np.sqrt(expected_v) + 1e-8)
    expected /= np.linalg.norm(expected, axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(numpy(got_v), expected_v, rtol=1e-5)
    np.testing.assert_allclose(numpy(got), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(numpy(got), axis=(-2, -1)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("normalization", [rule.normuon, rule.adamuon])
def test_zero_blocks_and_neurons_give_zeros_not_nan(normalization):
    o = arrays(14, (2, 4, 6))
    o[0] = 0.0  # a zero block
    o[1, :, 2] = 0.0  # a zero output neuron
    state = np.zeros((2, 1, 6) if normalization is rule.normuon else o.shape, "float32")
    got, _ = normalization(ops.convert_to_tensor(o), ops.convert_to_tensor(state), 0.9)
    got = numpy(got)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_array_equal(got[1, :, 2], 0.0)


@pytest.mark.parametrize("scale", ["naive", "jordan", "mup", "moonlight"])
@pytest.mark.parametrize("d_in, d_out", [(64, 256), (256, 64), (128, 128), (1, 300)])
def test_matches_the_formulas(scale, d_in, d_out):
    assert update_scale(scale, d_in, d_out) == pytest.approx(reference.scale(scale, d_in, d_out))


def test_orientation_follows_keras_kernels():
    # A Dense kernel (d_in=64, d_out=256) widens: Jordan's factor is 2. The
    # torch convention (out, in) would read the same shape as narrowing.
    assert update_scale("jordan", 64, 256) == pytest.approx(2.0)
    assert update_scale("jordan", 256, 64) == 1.0
    assert update_scale("mup", 256, 64) == pytest.approx(0.5)


def test_moonlight_rms_rate():
    assert update_scale("moonlight", 100, 400, rms_rate=0.3) == pytest.approx(6.0)
    assert update_scale("moonlight", 100, 400, rms_rate=None) == 1.0


def test_unknown_scale_is_an_error():
    with pytest.raises(ValueError, match="scale"):
        update_scale("adam", 4, 4)


def test_checked_scale_names_the_argument():
    assert rule.checked_scale("jordan", rule.DEFAULT_RMS_RATE) == "jordan"
    assert rule.checked_scale("moonlight", 0.3) == "moonlight"
    with pytest.raises(ValueError, match="scale"):
        rule.checked_scale("adam", rule.DEFAULT_RMS_RATE)
    with pytest.raises(ValueError, match="rms_rate"):
        rule.checked_scale("mup", 0.3)


def test_block_norms_are_the_frobenius_norm_of_each_block():
    blocks = np.random.default_rng(5).normal(size=(3, 4, 6)).astype("float32")
    norms = ops.convert_to_numpy(rule.block_norms(blocks))
    np.testing.assert_allclose(
        norms, np.linalg.norm(blocks.astype(np.float64), axis=(1, 2)), rtol=1e-6
    )
