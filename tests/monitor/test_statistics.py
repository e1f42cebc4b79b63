"""The monitor's numbers, each from tensors given directly."""

import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon.monitor import statistics
from keras_muon.update import rule
from tests.helpers import random_arrays


def test_squared_norms_and_finiteness_per_tensor():
    a, b = random_arrays([(3, 4), (5,)], seed=0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(statistics.squared_norms([a, b])),
        [np.sum(a**2), np.sum(b**2)],
        rtol=1e-6,
    )
    b[2] = np.inf
    finite = statistics.finite([a, b, np.full(2, np.nan)])
    assert ops.convert_to_numpy(finite).tolist() == [True, False, False]
    # No tensors: empty results of the same dtypes, so one graph serves.
    assert ops.convert_to_numpy(statistics.squared_norms([])).shape == (0,)
    assert ops.convert_to_numpy(statistics.finite([])).dtype == bool


def test_step_reductions_take_the_change_in_the_variables_dtype():
    before, after, moment = random_arrays([(3, 4), (3, 4), (6,)], seed=4)
    moment[1] = np.nan
    low = [ops.cast(x, "bfloat16") for x in (before, after)]
    update_squares, weight_squares, finite = (
        ops.convert_to_numpy(x)
        for x in statistics.step_reductions(
            [before, low[0]], [after, low[1]], [moment, np.ones(2, "float32")]
        )
    )
    # bfloat16 − bfloat16 rounds to bfloat16, as the step's change did.
    low_change = ops.convert_to_numpy(ops.cast(low[1] - low[0], "float32"))
    np.testing.assert_allclose(
        update_squares, [np.sum((after - before) ** 2), np.sum(low_change**2)], rtol=1e-6
    )
    low_after = ops.convert_to_numpy(ops.cast(low[1], "float32"))
    np.testing.assert_allclose(weight_squares, [np.sum(after**2), np.sum(low_after**2)], rtol=1e-6)
    assert finite.tolist() == [False, True]
    copies = statistics.copies([before, low[0]])
    np.testing.assert_array_equal(ops.convert_to_numpy(copies[0]), before)


def test_route_statistics_pool_the_entries_and_rank_the_variables():
    sizes = [4, 16]
    update_squares, weight_squares = np.array([0.04, 0.16]), np.array([4.0, 64.0])
    values, ratios = statistics.route_statistics(sizes, update_squares, weight_squares)
    assert values["update_rms"] == pytest.approx(np.sqrt(0.2 / 20))
    assert values["weight_rms"] == pytest.approx(np.sqrt(68.0 / 20))
    assert values["update_ratio"] == pytest.approx(np.sqrt(0.2 / 68.0))
    np.testing.assert_allclose(ratios, [0.1, 0.05])
    assert (
        values["min_variable_ratio"],
        values["max_variable_ratio"],
    ) == pytest.approx((0.05, 0.1))


def test_a_variable_of_zero_weights_has_no_ratio():
    values, ratios = statistics.route_statistics([2, 2], np.array([1.0, 1.0]), np.array([0.0, 4.0]))
    assert np.isnan(ratios[0]) and ratios[1] == pytest.approx(0.5)
    assert values["min_variable_ratio"] == values["max_variable_ratio"] == pytest.approx(0.5)


@pytest.mark.parametrize("nesterov", [True, False])
def test_the_direction_is_recovered_from_two_momentums(nesterov):
    before, gradient = random_arrays([(6, 5), (6, 5)], seed=1)
    after, direction = rule.momentum_and_direction(before, gradient, 0.9, nesterov)
    recovered = statistics.orthogonalized_direction(
        before, ops.convert_to_numpy(after), 0.9, nesterov
    )
    np.testing.assert_allclose(recovered, ops.convert_to_numpy(direction), rtol=1e-5, atol=1e-6)


def test_samples_spread_over_all_candidates():
    assert statistics.sample(3, 2) == [0, 1]
    assert statistics.sample(3, 9) == [0, 4, 8]
    assert statistics.sample(1, 5) == [0]


def test_singular_values_are_taken_along_the_inputs_directions_above_the_floor():
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    v, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    sigma = np.array([1.0, 0.1, 0.01, 1e-6])  # the last below 1e-3·‖x‖_F
    x = u @ np.diag(sigma) @ v[:4]
    images = np.array([1.05, 0.9, 0.95, 0.0])  # what msign made of each
    orthogonal = u @ np.diag(images) @ v[:4]
    assert statistics.singular_value_range_of(x[None], orthogonal[None]) == pytest.approx(
        (0.9, 1.05)
    )
    # With a floor below the last direction, its zero counts.
    assert statistics.singular_value_range_of(
        x[None], orthogonal[None], floor=1e-7
    ) == pytest.approx((0.0, 1.05), abs=1e-12)


def test_singular_values_of_the_optimizers_msign():
    (x,) = random_arrays([(2, 8, 16)], seed=2)
    low, high = statistics.singular_value_range(keras_muon.Muon(ns_steps=5), x)
    values = np.linalg.svd(ops.convert_to_numpy(keras_muon.msign(x, steps=5)), compute_uv=False)
    # A random Gaussian block is well conditioned: every direction counts.
    assert (low, high) == pytest.approx((values.min(), values.max()), rel=1e-5)
    # Polar Express, 5 steps: about [0.84, 1.12].
    assert 0.8 < low < high < 1.15
    # More steps leave less spread: the numbers measure the iteration.
    low, high = statistics.singular_value_range(keras_muon.Muon(ns_steps=10), x)
    assert high - low < 1e-3
    # AdaMuon orthogonalizes sign(N).
    low, high = statistics.singular_value_range(keras_muon.AdaMuon(), x)
    values = np.linalg.svd(
        ops.convert_to_numpy(keras_muon.msign(np.sign(x), steps=5)), compute_uv=False
    )
    assert (low, high) == pytest.approx((values.min(), values.max()), rel=1e-5)
