"""msign by Newton–Schulz: accuracy against SVD and the float64
reference, schedules, precision, FLOPs."""

import types

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon import coefficient_schedule
from keras_muon import msign
from keras_muon.update import newton_schulz as newton_schulz_module
from keras_muon.update.newton_schulz import JORDAN
from keras_muon.update.newton_schulz import POLAR_EXPRESS
from keras_muon.update.newton_schulz import YOU
from keras_muon.update.newton_schulz import newton_schulz
from keras_muon.update.newton_schulz import newton_schulz_flops
from keras_muon.update.newton_schulz import newton_schulz_matmuls
from keras_muon.update.newton_schulz import tf32_split
from keras_muon.update.newton_schulz import tf32_x3
from keras_muon.update.newton_schulz import uses_gram_iteration
from tests import reference
from tests.helpers import run


def run_msign(x, **kwargs):
    return ops.convert_to_numpy(msign(ops.convert_to_tensor(x), **kwargs))


def with_singular_values(sigma, m, n, seed=0):
    """A float32 (m, n) matrix with the given singular values."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, len(sigma))))
    v, _ = np.linalg.qr(rng.normal(size=(n, len(sigma))))
    return ((u * sigma) @ v.T).astype("float32")


def singular_values(x):
    return np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)


def normalised_spectrum(smallest, n):
    """n geometric singular values whose smallest, after the Frobenius
    normalisation msign does (σ / ‖σ‖₂), is `smallest`."""
    low = smallest
    for _ in range(100):
        low = smallest * np.linalg.norm(np.geomspace(low, 1.0, n))
    return np.geomspace(low, 1.0, n)


# Singular values whose normalised values span [1e-3, 0.4]: the smallest is
# at the edge of the range Polar Express is designed for.
SIGMA = normalised_spectrum(1e-3, 24)
SIGMA_NORMALISED = SIGMA / np.linalg.norm(SIGMA)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (24, 24)])
def test_polar_express_5_steps_reaches_its_documented_range(shape):
    x = with_singular_values(SIGMA * 1.7, *shape)
    out = run_msign(x, steps=5)
    sigma_out = singular_values(out)[:24]
    assert sigma_out.min() >= 0.835 and sigma_out.max() <= 1.13
    # Only singular values change: the singular vectors are those of x.
    np.testing.assert_allclose(reference.svd_msign(out), reference.svd_msign(x), atol=2e-4)


@pytest.mark.parametrize("steps", [7, 8])
def test_polar_express_long_schedules_are_within_one_percent_of_svd(steps):
    x = with_singular_values(SIGMA, 24, 36)
    out = run_msign(x, steps=steps)
    sigma_out = singular_values(out)[:24]
    assert np.abs(sigma_out - 1).max() <= 0.01
    np.testing.assert_allclose(out, reference.svd_msign(x), atol=0.01)


@pytest.mark.parametrize("coefficients", ["polar_express", "jordan", "you"])
@pytest.mark.parametrize("steps", [3, 5, 6])
def test_singular_values_follow_the_schedule_polynomials(coefficients, steps):
    x = with_singular_values(SIGMA, 24, 48, seed=steps)
    schedule = coefficient_schedule(coefficients, steps)
    expected = reference.composed_polynomial(SIGMA_NORMALISED, schedule)
    out = run_msign(x, steps=steps, coefficients=coefficients)
    # Compare sorted: the polynomials need not keep the order of σ.
    np.testing.assert_allclose(
        np.sort(singular_values(out)), np.sort(expected), atol=2e-3 * expected.max()
    )
    # The singular vectors are those of x: the polar factors agree.
    np.testing.assert_allclose(reference.svd_msign(out), reference.svd_msign(x), atol=2e-3)


@pytest.mark.parametrize("coefficients", ["polar_express", "jordan", "you"])
def test_matches_float64_reference(coefficients):
    x = np.random.default_rng(1).normal(size=(3, 20, 36)).astype("float32")
    schedule = coefficient_schedule(coefficients, 5)
    np.testing.assert_allclose(
        run_msign(x, coefficients=coefficients),
        reference.newton_schulz(x, schedule),
        atol=2e-5,
    )


def test_jordan_and_you_ranges():
    x = with_singular_values(np.geomspace(1e-2, 1.0, 16), 16, 32)
    # Normalised σ ≥ 1e-2/‖σ‖: Jordan lands in about [0.68, 1.13], "you"
    # in about [0.97, 1.04] (from its design range of [1e-2, 1]).
    jordan = singular_values(run_msign(x, coefficients="jordan"))[:16]
    assert jordan.min() >= 0.6 and jordan.max() <= 1.14
    you = singular_values(run_msign(x, coefficients="you"))[:16]
    assert you.max() <= 1.04


def test_batched_equals_one_matrix_at_a_time():
    x = np.random.default_rng(2).normal(size=(2, 3, 16, 24)).astype("float32")
    batched = run_msign(x)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(batched[i, j], run_msign(x[i, j]), atol=1e-6)


def test_tall_is_the_transpose_of_wide():
    x = np.random.default_rng(3).normal(size=(40, 12)).astype("float32")
    np.testing.assert_allclose(run_msign(x), run_msign(x.T).T, atol=1e-6)


@pytest.mark.parametrize("factor", [1e-30, 1e-18, 1e12, 1e30])
def test_scale_invariant_over_the_float32_range(factor):
    x = np.random.default_rng(4).normal(size=(16, 32)).astype("float32")
    scaled = (x.astype(np.float64) * factor).astype("float32")
    np.testing.assert_allclose(run_msign(scaled), run_msign(x), atol=1e-5)


def test_zero_matrix_gives_zeros_and_leaves_its_batch_alone():
    x = np.random.default_rng(5).normal(size=(3, 8, 12)).astype("float32")
    x[1] = 0.0
    out = run_msign(x)
    assert np.all(out[1] == 0.0)
    np.testing.assert_allclose(out[0], run_msign(x[0]), atol=1e-6)


def test_non_finite_input_is_not_hidden():
    x = np.random.default_rng(6).normal(size=(8, 12)).astype("float32")
    x[2, 3] = np.nan
    assert np.isnan(run_msign(x)).all()
    x[2, 3] = np.inf
    assert np.isnan(run_msign(x)).all()


@pytest.mark.parametrize("shape", [(1, 37), (37, 1)])
def test_vectors_are_normalised(shape):
    x = np.random.default_rng(7).normal(size=shape).astype("float32")
    out = run_msign(x, steps=8)
    np.testing.assert_allclose(out, x / np.linalg.norm(x), atol=1e-5)


def test_very_wide_matrix():
    x = with_singular_values(np.geomspace(0.05, 1.0, 8), 8, 65536)
    out = run_msign(x)
    assert out.shape == (8, 65536)
    sigma_out = singular_values(out)
    assert sigma_out.min() >= 0.835 and sigma_out.max() <= 1.13


# bfloat16 keeps 8 significant bits; the first Polar Express step cancels
# terms about 40 times larger than its result, so directions of singular
# values near 1e-3 move by about 10%, and the extreme singular values by
# about 0.01. float16 keeps 11 bits.
@pytest.mark.parametrize(
    "dtype, relative_error, sigma_range",
    [("bfloat16", 0.15, (0.82, 1.14)), ("float16", 0.02, (0.83, 1.13))],
)
def test_low_precision_iteration_is_close_to_float32(dtype, relative_error, sigma_range):
    x = with_singular_values(SIGMA, 24, 36)
    out = run_msign(x, dtype=dtype)
    assert out.dtype == np.float32
    exact = run_msign(x)
    assert np.linalg.norm(out - exact) <= relative_error * np.linalg.norm(exact)
    sigma_out = singular_values(out)
    assert sigma_range[0] <= sigma_out.min() and sigma_out.max() <= sigma_range[1]


# And the iteration really runs in that dtype: float32 stays within about
# 1e-5 of the float64 iteration, bfloat16 (8 significant bits) moves this
# matrix's result by 7–9% and float16 (11 bits) by about 1% on every backend.
@pytest.mark.parametrize("dtype, least_relative_error", [("bfloat16", 0.03), ("float16", 3e-3)])
def test_low_precision_iteration_is_not_float32(dtype, least_relative_error):
    x = ops.convert_to_tensor(with_singular_values(SIGMA, 24, 36))
    schedule = coefficient_schedule("polar_express", 5)
    out = newton_schulz(x, schedule, dtype)
    assert out.dtype == x.dtype
    exact = ops.convert_to_numpy(newton_schulz(x, schedule))
    error = np.linalg.norm(ops.convert_to_numpy(out) - exact)
    assert error >= least_relative_error * np.linalg.norm(exact)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_input_keeps_its_dtype(dtype):
    x = np.random.default_rng(8).normal(size=(8, 16)).astype("float32") * 1e-3
    out = msign(ops.cast(ops.convert_to_tensor(x), dtype))
    assert ops.convert_to_numpy(ops.cast(out, "float32")).dtype == np.float32
    assert "float16" in str(out.dtype)
    np.testing.assert_allclose(
        ops.convert_to_numpy(ops.cast(out, "float32")), run_msign(x), atol=2e-2
    )


def test_polar_express_follows_the_papers_algorithm():
    # Amsel et al.: normalise by 1.01·‖X‖_F, evaluate every polynomial but
    # the final fixed point at x/1.01, and repeat the fixed point.
    def paper(x, steps):
        x = x.astype(np.float64) / (1.01 * np.linalg.norm(x))
        table = list(POLAR_EXPRESS[:-1])[:steps]
        table += [POLAR_EXPRESS[-1]] * (steps - len(table))
        for i, (a, b, c) in enumerate(table):
            y = x / 1.01 if i < len(POLAR_EXPRESS) - 1 else x
            x = a * y + b * y @ y.T @ y + c * y @ y.T @ y @ y.T @ y
        return x

    x = np.random.default_rng(9).normal(size=(12, 20)).astype("float32")
    for steps in (1, 5, 8, 10):
        np.testing.assert_allclose(run_msign(x, steps=steps), paper(x, steps), atol=2e-5)


# The published tables, written out here rather than read from the code.
PUBLISHED_JORDAN = ((3.4445, -4.7750, 2.0315),)
PUBLISHED_YOU = (  # Cesista, You et al. (2025)
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
PUBLISHED_POLAR_EXPRESS = (  # Amsel et al. (2025), arXiv 2505.16932
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)


def test_coefficient_tables_are_the_published_ones():
    assert JORDAN == PUBLISHED_JORDAN
    assert YOU == PUBLISHED_YOU
    assert POLAR_EXPRESS == PUBLISHED_POLAR_EXPRESS


def test_polar_express_schedule_is_the_published_table_at_x_over_1_01():
    # Every polynomial but the fixed point is evaluated at x/1.01:
    # p(x/1.01) = (a/1.01, b/1.01³, c/1.01⁵). The first one also takes the
    # normalisation by 1.01·‖X‖_F, so it is evaluated at x/1.01².
    *polynomials, fixed_point = PUBLISHED_POLAR_EXPRESS
    expected = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in polynomials]
    a, b, c = polynomials[0]
    expected[0] = (a / 1.01**2, b / 1.01**6, c / 1.01**10)
    for steps in (1, 5, 7):
        np.testing.assert_allclose(
            coefficient_schedule("polar_express", steps), expected[:steps], rtol=1e-14
        )
    # Longer schedules repeat the fixed point, unchanged.
    schedule = coefficient_schedule("polar_express", 10)
    np.testing.assert_allclose(schedule[:7], expected, rtol=1e-14)
    assert schedule[7:] == (fixed_point,) * 3


def test_custom_schedule_repeats_its_last_triple():
    assert coefficient_schedule([(3, -3.2, 1.2), (1.875, -1.25, 0.375)], 4) == (
        (3.0, -3.2, 1.2),
        (1.875, -1.25, 0.375),
        (1.875, -1.25, 0.375),
        (1.875, -1.25, 0.375),
    )
    assert coefficient_schedule((3.4445, -4.775, 2.0315), 2) == coefficient_schedule("jordan", 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "ns_steps"),
        ({"steps": 2.5}, "ns_steps"),
        ({"steps": True}, "ns_steps"),
        ({"steps": "5"}, "Received: ns_steps='5'"),
        ({"coefficients": "newton"}, "ns_coefficients"),
        ({"coefficients": []}, "ns_coefficients"),
        ({"coefficients": [(1.0, 2.0)]}, "ns_coefficients"),
        ({"coefficients": [(1.0, 2.0, float("nan"))]}, "ns_coefficients"),
        ({"coefficients": [(1.0, 2.0, "c")]}, "ns_coefficients"),
        ({"coefficients": [(3, -3.2, 1.2)] * 6}, "never be used"),
        ({"coefficients": [(1.0, 2.0, 3.0)]}, "diverge"),
    ],
)
def test_invalid_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_msign(np.ones((4, 4), "float32"), **kwargs)


def test_rank_one_input_is_an_error():
    with pytest.raises(ValueError, match="rank >= 2"):
        run_msign(np.ones((4,), "float32"))


def test_which_matrices_are_iterated_on_their_gram_matrix():
    assert uses_gram_iteration(256, 1024, 5)
    assert uses_gram_iteration(1024, 256, 5)
    assert not uses_gram_iteration(256, 256, 5)
    # At 1.5 times as wide, both iterations take the same FLOPs.
    assert not uses_gram_iteration(256, 384, 5)
    assert uses_gram_iteration(256, 385, 5)
    assert not uses_gram_iteration(256, 1024, 5, "bfloat16")
    assert not uses_gram_iteration(256, 1024, 1)


# Singular values down to 1e-6: below the range the schedules are made
# for, where float32 errors in the Gram iterates would show first.
@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (48, 192)])
@pytest.mark.parametrize(
    "coefficients, steps", [("polar_express", 5), ("polar_express", 8), ("jordan", 5)]
)
def test_gram_iteration_matches_float64_reference(shape, coefficients, steps):
    assert uses_gram_iteration(*shape, steps)
    x = with_singular_values(np.geomspace(1e-6, 1.0, min(shape)), *shape, seed=10)
    expected = reference.newton_schulz(x, coefficient_schedule(coefficients, steps))
    out = run_msign(x, steps=steps, coefficients=coefficients)
    assert np.linalg.norm(out - expected) <= 1e-4 * np.linalg.norm(expected)


@pytest.mark.parametrize(
    "shape, steps, dtype",
    [
        ((16, 16), 5, None),
        ((16, 64), 5, None),
        ((16, 64), 8, None),
        ((16, 64), 1, None),
        ((16, 64), 5, "bfloat16"),
    ],
)
def test_flop_count_is_that_of_the_products_performed(monkeypatch, shape, steps, dtype):
    performed = []
    matmul = newton_schulz_module.matmul

    def counting_matmul(a, b, dtype):
        performed.append(2 * int(np.prod(a.shape)) * b.shape[-1])
        return matmul(a, b, dtype)

    monkeypatch.setattr(newton_schulz_module, "matmul", counting_matmul)
    x = ops.convert_to_tensor(np.random.default_rng(11).normal(size=(3, *shape)).astype("float32"))
    newton_schulz(x, coefficient_schedule("polar_express", steps), dtype)
    assert sum(performed) == 3 * newton_schulz_flops(*shape, steps, dtype)


def test_newton_schulz_needs_wide_matrices():
    with pytest.raises(ValueError, match="rows <= cols"):
        newton_schulz(ops.ones((5, 3)), coefficient_schedule("polar_express", 5))


# Precision: what each `ns_dtype` computes its products in.

BACKEND = keras.backend.backend()
ON_CPU = "cpu" in str(ops.zeros(()).device).lower()
PRECISIONS = [None, "float32", "tf32", "bfloat16", "float16"]


def tf32_rounded(x):
    """`x` as float32 with its 13 low mantissa bits cleared: what a TF32
    unit reads of it (truncating, the worse of its roundings)."""
    bits = np.asarray(x, dtype=np.float32).view(np.int32)
    return (bits & np.int32(-(1 << 13))).view(np.float32)


def tf32_product(a, b):
    """A TF32 tensor-core product, emulated on the CPU: TF32 operands,
    exact products, float32 result."""
    a, b = (tf32_rounded(ops.convert_to_numpy(t)).astype(np.float64) for t in (a, b))
    return ops.convert_to_tensor((a @ b).astype(np.float32))


def relative_error(got, exact):
    return np.linalg.norm(np.asarray(got, np.float64) - exact) / np.linalg.norm(exact)


def test_tf32_split_is_exact_and_its_high_part_fits_tf32():
    rng = np.random.default_rng(12)
    # Down to 1e-30, where `lo` is still a normal number: JAX and GPUs
    # flush subnormal ones to zero.
    scales = np.float32([1e-30, 1e-3, 1.0, 7.0, 1e20, 1e37])
    x = (rng.normal(size=(6, 64)) * scales[:, None]).astype(np.float32)
    x[:, :2] = [0.0, np.finfo(np.float32).max]
    hi, lo = (ops.convert_to_numpy(t) for t in tf32_split(ops.convert_to_tensor(x)))
    assert hi.dtype == lo.dtype == np.float32
    assert np.array_equal(hi + lo, x)
    # At most 10 explicit mantissa bits: the 13 low ones are zero.
    assert not np.any(hi.view(np.int32) & ((1 << 13) - 1))
    assert np.array_equal(np.sign(hi), np.sign(x))
    nonzero = x != 0
    assert np.all(np.abs(lo[nonzero]) < 2.0**-10 * np.abs(x[nonzero]))
    assert not np.any(lo[~nonzero])


def test_three_tf32_products_recover_float32_accuracy(monkeypatch):
    # Emulated TF32 products: one alone is 7.7e-4 off the float64 product
    # here, the three of tf32_x3 3.5e-7, a float32 product 2e-7.
    rng = np.random.default_rng(13)
    a, b = (rng.normal(size=shape).astype(np.float32) for shape in [(2, 96, 128), (2, 128, 80)])
    exact = a.astype(np.float64) @ b.astype(np.float64)
    monkeypatch.setattr(newton_schulz_module, "_product", tf32_product)
    one = ops.convert_to_numpy(tf32_product(a, b))
    three = ops.convert_to_numpy(tf32_x3(ops.convert_to_tensor(a), ops.convert_to_tensor(b)))
    assert relative_error(one, exact) > 5e-4
    assert relative_error(three, exact) < 5e-7


@pytest.mark.skipif(BACKEND == "jax", reason="JAX takes the precision on each product")
def test_float32_iteration_on_emulated_tf32_is_as_accurate_as_on_a_cpu(monkeypatch):
    # Where the user's global setting lets products run in TF32 (here
    # emulated), "float32" computes each one from three TF32 products and
    # stays as close to U·Vᵀ as on a CPU (3e-6); "tf32" takes the single
    # TF32 product and lands about 5e-3 away.
    x = ops.convert_to_tensor(with_singular_values(normalised_spectrum(1e-3, 64), 64, 256))
    exact = reference.svd_msign(ops.convert_to_numpy(x))
    on_cpu = np.abs(ops.convert_to_numpy(msign(x, 8)) - exact).max()
    monkeypatch.setattr(newton_schulz_module, "_product", tf32_product)
    monkeypatch.setattr(newton_schulz_module, "_may_use_tf32", lambda x: True)
    float32 = np.abs(ops.convert_to_numpy(msign(x, 8)) - exact).max()
    tf32 = np.abs(ops.convert_to_numpy(msign(x, 8, dtype="tf32")) - exact).max()
    assert on_cpu < 5e-6 and float32 < 5e-6
    assert tf32 > 1e-3


# On a CPU every float32 mode multiplies in float32; 8 Polar Express steps
# on a 64×256 matrix with σ down to 1e-3 (iterated on its Gram matrix in
# float32) land within 3e-6 of U·Vᵀ, bfloat16 about 3e-2 away and float16
# about 4e-3, on every backend.
@pytest.mark.skipif(not ON_CPU, reason="the accuracy of a CPU")
@pytest.mark.parametrize(
    "dtype, error_range, sigma_error",
    [
        (None, (0, 1e-5), 1e-5),
        ("float32", (0, 1e-5), 1e-5),
        ("tf32", (0, 1e-5), 1e-5),
        ("bfloat16", (1e-2, 6e-2), 0.01),
        ("float16", (1e-3, 1e-2), 2e-3),
    ],
)
def test_accuracy_of_each_precision_on_a_cpu(dtype, error_range, sigma_error):
    x = with_singular_values(normalised_spectrum(1e-3, 64), 64, 256)
    out = run_msign(x, steps=8, dtype=dtype)
    error = np.abs(out - reference.svd_msign(x)).max()
    assert error_range[0] <= error <= error_range[1]
    assert np.abs(singular_values(out) - 1).max() <= sigma_error
    if dtype == "tf32":
        np.testing.assert_array_equal(out, run_msign(x, steps=8))


def global_precision_settings():
    """The current backend's process-wide matmul precision settings."""
    if BACKEND == "jax":
        import jax

        return jax.config.jax_default_matmul_precision
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.tensor_float_32_execution_enabled()
    import torch

    backends = torch.backends
    return (
        torch.get_float32_matmul_precision(),
        backends.fp32_precision,
        backends.cuda.matmul.fp32_precision,
        backends.mkldnn.matmul.fp32_precision,
    )


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_no_global_precision_setting_changes(dtype):
    before = global_precision_settings()
    run_msign(
        np.random.default_rng(14).normal(size=(2, 16, 48)).astype(np.float32),
        dtype=dtype,
    )
    run(
        keras_muon.Muon(learning_rate=0.01, ns_dtype=dtype),
        [np.eye(12, 16, dtype="float32")],
        [[np.ones((12, 16), "float32")]],
    )
    assert global_precision_settings() == before


def dot_precisions(lowered_text):
    """The `precision = [...]` of every dot in a lowered JAX program."""
    lines = [line for line in lowered_text.splitlines() if "dot_general" in line]
    return [line.split("precision = ")[1].split("]")[0] + "]" for line in lines]


JAX_PRECISION_TEXT = {
    None: "[HIGHEST, HIGHEST]",
    "float32": "[HIGHEST, HIGHEST]",
    "tf32": "[HIGH, HIGH]",
    "bfloat16": "[DEFAULT, DEFAULT]",
    "float16": "[DEFAULT, DEFAULT]",
}


@pytest.mark.skipif(BACKEND != "jax", reason="JAX programs carry the precision of each product")
@pytest.mark.parametrize("user_default", [None, "bfloat16", "float32"])
@pytest.mark.parametrize("dtype", PRECISIONS)
def test_jax_products_carry_the_precision_whatever_the_users_default(dtype, user_default):
    import jax

    x = np.random.default_rng(15).normal(size=(3, 16, 64)).astype(np.float32)
    with jax.default_matmul_precision(user_default):
        text = jax.jit(lambda x: msign(x, dtype=dtype)).lower(x).as_text()
    precisions = dot_precisions(text)
    assert len(precisions) == sum(newton_schulz_matmuls(16, 64, 5, dtype))
    assert set(precisions) == {JAX_PRECISION_TEXT[dtype]}


@pytest.mark.skipif(BACKEND != "jax", reason="JAX programs carry the precision of each product")
@pytest.mark.parametrize("dtype", [None, "tf32", "bfloat16"])
def test_jax_muon_step_carries_the_precision(dtype):
    import jax

    optimizer = keras_muon.Muon(learning_rate=0.01, ns_dtype=dtype)
    variables = [keras.Variable(np.ones((16, 64), "float32"), name="kernel")]
    optimizer.build(variables)
    state = [v.value for v in optimizer.variables]
    lowered = jax.jit(optimizer.stateless_apply).lower(
        state, [np.ones((16, 64), "float32")], [v.value for v in variables]
    )
    precisions = dot_precisions(lowered.as_text())
    assert len(precisions) == sum(newton_schulz_matmuls(16, 64, 5, dtype))
    assert set(precisions) == {JAX_PRECISION_TEXT[dtype]}


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's TF32 setting")
def test_tensorflow_splits_products_where_its_tf32_setting_applies(monkeypatch):
    import tensorflow as tf

    x = ops.ones((4, 4))
    assert tf.config.experimental.tensor_float_32_execution_enabled()  # the default
    monkeypatch.setattr(newton_schulz_module, "_tf_gpu_has_tf32", lambda: False)
    assert not newton_schulz_module._may_use_tf32(x)
    monkeypatch.setattr(newton_schulz_module, "_tf_gpu_has_tf32", lambda: True)
    assert newton_schulz_module._may_use_tf32(x)
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        assert not newton_schulz_module._may_use_tf32(x)
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(True)


@pytest.mark.skipif(BACKEND != "torch", reason="torch's float32 matmul precision")
def test_torch_splits_products_where_its_precision_setting_applies():
    import torch

    on_cuda = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"))
    on_cpu = torch.ones(4, 4, device="cpu")
    original = torch.get_float32_matmul_precision()
    assert original == "highest"  # the default
    assert not newton_schulz_module._may_use_tf32(on_cuda)
    torch.set_float32_matmul_precision("high")
    try:
        assert newton_schulz_module._may_use_tf32(on_cuda)
        # A CPU multiplies in float32 whatever the setting.
        assert not newton_schulz_module._may_use_tf32(on_cpu)
    finally:
        torch.set_float32_matmul_precision(original)


@pytest.mark.parametrize("dtype", ["float64", "tf16", "high"])
def test_unknown_precision_names_ns_dtype_and_its_values(dtype):
    with pytest.raises(ValueError, match=r"ns_dtype.*'tf32'.*Received: ns_dtype="):
        run_msign(np.ones((4, 4), "float32"), dtype=dtype)
