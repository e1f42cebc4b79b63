"""Muon's momentum stored in float32, bfloat16 or int8 blocks."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon.update import momentum_storage
from tests.backends.distributed_cases import update_scratch_bytes


def numpy_quantize(x, block):
    """The int8 codes and scales of `x` in float32 NumPy arithmetic."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scales = np.abs(blocks).max(axis=-1)
    factor = np.float32(127.0) / np.where(scales > 0, scales, np.float32(1.0))
    codes = np.round(blocks * factor[..., None])
    return codes.reshape(x.shape).astype("int8"), scales


def test_int8_blocks_are_the_largest_magnitude_over_127():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 4096)) * rng.uniform(1e-6, 1e3, (3, 1))).astype("float32")
    x[1, 2048:] = 0.0  # an all-zero block
    codes, scales = momentum_storage.quantize(ops.convert_to_tensor(x), 2048)
    expected_codes, expected_scales = numpy_quantize(x, 2048)
    np.testing.assert_array_equal(ops.convert_to_numpy(codes), expected_codes)
    np.testing.assert_array_equal(ops.convert_to_numpy(scales), expected_scales)
    assert ops.convert_to_numpy(codes).dtype == np.int8
    assert np.abs(expected_codes).max() == 127
    restored = ops.convert_to_numpy(momentum_storage.dequantize(codes, scales))
    # Within half a code step of each block's scale; the zero block exact.
    step = np.repeat(expected_scales, 2048, axis=-1) / 127
    assert np.all(np.abs(restored - x) <= 0.5 * step * (1 + 1e-5))
    np.testing.assert_array_equal(restored[1, 2048:], 0.0)


def test_a_non_finite_block_restores_as_nan_and_no_other():
    x = np.ones((2, 8), "float32")
    x[0, 1] = np.inf
    x[1, 6] = np.nan
    codes, scales = momentum_storage.quantize(ops.convert_to_tensor(x), 4)
    restored = ops.convert_to_numpy(momentum_storage.dequantize(codes, scales))
    assert np.isnan(restored[0, :4]).all() and np.isnan(restored[1, 4:]).all()
    np.testing.assert_array_equal(restored[0, 4:], 1.0)
    np.testing.assert_array_equal(restored[1, :4], 1.0)


def test_block_size_divides_the_axis_on_each_device():
    assert momentum_storage.block_size(14336) == 2048
    assert momentum_storage.block_size(384) == 128
    assert momentum_storage.block_size(3) == 1


def dense_model(width):
    inputs = keras.Input((16,))
    x = keras.layers.Dense(width, name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def two_steps(momentum_dtype, width=96):
    """The model, the optimizer, the gradients, and the weights after each
    of two steps of `Muon(momentum_dtype=...)` from the same start."""
    keras.utils.set_random_seed(0)
    model = dense_model(width)
    optimizer = keras_muon.Muon(learning_rate=0.01, momentum_dtype=momentum_dtype)
    optimizer.attach(model)
    rng = np.random.default_rng(1)
    grads = [
        [rng.standard_normal(v.shape).astype("float32") for v in model.trainable_variables]
        for _ in range(2)
    ]
    weights = []
    for step in grads:
        optimizer.apply([ops.convert_to_tensor(g) for g in step], model.trainable_variables)
        weights.append([ops.convert_to_numpy(v) for v in model.trainable_variables])
    return model, optimizer, grads, weights


def momentum_of(optimizer, name):
    return {v.path.split("/")[-1]: v for v in optimizer.variables}[name]


@pytest.mark.parametrize("momentum_dtype", ["bfloat16", "int8"])
def test_rounded_momentum_is_stored_rounded_and_read_in_float32(momentum_dtype):
    _, reference, grads, float32_weights = two_steps("float32")
    _, optimizer, _, weights = two_steps(momentum_dtype)
    # The first step's momentum is the gradient: Newton–Schulz sees it before
    # rounding, so the first update is float32 Muon's, bit for bit.
    for a, b in zip(float32_weights[0], weights[0]):
        np.testing.assert_array_equal(a, b)
    # M₂ = β·stored(G₁) + G₂, stored again.
    g1, g2 = grads[0][0], grads[1][0]  # the hidden kernel, (16, 96)
    state = optimizer._states[0]
    assert optimizer.routing_table()[0]["route"] == "muon" and state.dtype == "float32"
    if momentum_dtype == "bfloat16":
        to_bf16 = lambda x: ops.convert_to_numpy(ops.cast(ops.cast(x, "bfloat16"), "float32"))  # noqa: E731
        expected = to_bf16(0.95 * to_bf16(g1) + g2)
        stored = momentum_of(optimizer, "hidden_kernel_momentum")
        assert stored.dtype == "bfloat16"
        np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(stored, "float32")), expected)
    else:
        block = momentum_storage.block_size(96)
        codes, scales = numpy_quantize(g1, block)
        dequantized = (codes.reshape(16, -1, block) * (scales / 127)[..., None]).reshape(16, 96)
        expected_codes, expected_scales = numpy_quantize(0.95 * dequantized + g2, block)
        codes = momentum_of(optimizer, "hidden_kernel_momentum")
        assert codes.dtype == "int8" and tuple(codes.shape) == (16, 96)
        scales = momentum_of(optimizer, "hidden_kernel_momentum_scales")
        assert tuple(scales.shape) == (16, 96 // block)
        # One code of rounding between float32 orders of operations.
        assert np.abs(ops.convert_to_numpy(codes).astype(int) - expected_codes).max() <= 1
        np.testing.assert_allclose(ops.convert_to_numpy(scales), expected_scales, rtol=1e-6)
    # AdamW's moments (the head) stay float32.
    assert momentum_of(optimizer, "head_kernel_momentum").dtype == "float32"
    # Close to float32 Muon after the second step, not equal.
    hidden = np.abs(weights[1][0] - float32_weights[1][0]).max()
    assert 0 < hidden < 1e-3 * np.abs(float32_weights[1][0]).max()


def test_int8_momentum_is_a_quarter_of_float32_muon_and_an_eighth_of_adamw():
    model, optimizer, _, _ = two_steps("int8", width=2048)  # blocks of 2048
    muon = {row["path"] for row in optimizer.routing_table() if row["route"] == "muon"}
    names = {p.replace("/", "_") for p in muon}
    state_bytes = sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        for v in optimizer.variables
        if any(v.path.split("/")[-1].startswith(n) for n in names)
    )
    matrix_parameters = sum(
        int(np.prod(v.shape)) for v in model.trainable_variables if v.path in muon
    )
    assert state_bytes / (8 * matrix_parameters) <= 0.3  # AdamW: two float32 moments
    assert state_bytes / (4 * matrix_parameters) < 0.27


def test_momentum_dtype_is_checked_and_in_the_config():
    with pytest.raises(ValueError, match="momentum_dtype"):
        keras_muon.Muon(momentum_dtype="float16")
    config = keras_muon.NorMuon(momentum_dtype="int8").get_config()
    assert keras_muon.NorMuon.from_config(config).momentum_dtype == "int8"


@pytest.mark.parametrize("momentum_dtype", ["bfloat16", "int8"])
def test_rounded_momentum_saves_and_loads_exactly(tmp_path, momentum_dtype):
    model, optimizer, grads, _ = two_steps(momentum_dtype)
    model.compile(optimizer=optimizer, loss="mse")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    saved = {v.path: ops.convert_to_numpy(v) for v in optimizer.variables}
    restored = {v.path: ops.convert_to_numpy(v) for v in loaded.optimizer.variables}
    assert saved.keys() == restored.keys()
    for path_, value in saved.items():
        assert restored[path_].dtype == value.dtype, path_
        np.testing.assert_array_equal(restored[path_], value, err_msg=path_)
    # And both go on the same way.
    step = [ops.convert_to_tensor(g) for g in grads[1]]
    optimizer.apply(step, model.trainable_variables)
    loaded.optimizer.apply(step, loaded.trainable_variables)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_a_bfloat16_momentum_loads_into_a_float32_one_and_back(tmp_path):
    model, optimizer, _, _ = two_steps("bfloat16")
    model.compile(optimizer=optimizer, loss="mse")
    model.save_weights(tmp_path / "bfloat16.weights.h5")
    saved = ops.convert_to_numpy(
        ops.cast(momentum_of(optimizer, "hidden_kernel_momentum"), "float32")
    )
    for dtype in ("float32", "bfloat16"):
        other = dense_model(96)
        other.compile(optimizer=keras_muon.Muon(momentum_dtype=dtype), loss="mse")
        other.optimizer.attach(other)
        other.optimizer.build(other.trainable_variables)
        other.load_weights(tmp_path / "bfloat16.weights.h5")
        loaded = momentum_of(other.optimizer, "hidden_kernel_momentum")
        assert loaded.dtype == dtype
        np.testing.assert_array_equal(ops.convert_to_numpy(ops.cast(loaded, "float32")), saved)


def compiled_scratch_bytes(depth, momentum_dtype):
    """XLA's scratch of one update (`update_scratch_bytes`) of `depth` pairs
    of Dense layers (256, 1024) and (1024, 256), a bucket of its own each."""
    x = keras.Input((8, 256))
    y = x
    for _ in range(depth):
        y = keras.layers.Dense(256)(keras.layers.Dense(1024)(y))
    model = keras.Model(x, keras.layers.Dense(4)(y))
    optimizer = keras_muon.Muon(momentum_dtype=momentum_dtype, ns_bucket_bytes=2**20)
    return update_scratch_bytes(model, optimizer)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA's compile-time memory analysis")
@pytest.mark.parametrize("momentum_dtype", ["float32", "bfloat16", "int8"])
def test_the_update_scratch_does_not_grow_with_the_depth_of_the_model(momentum_dtype):
    # A rounded momentum is written over the old one bucket by bucket, not
    # copied at the start of the update for every variable.
    assert compiled_scratch_bytes(8, momentum_dtype) == compiled_scratch_bytes(2, momentum_dtype)
