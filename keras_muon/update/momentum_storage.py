"""How Muon's momentum is stored between steps: `momentum_dtype`.

`"float32"` keeps the momentum as the update computes it. `"bfloat16"`
rounds it once per step. `"int8"` stores it in blocks of up to 2048
consecutive elements along its last axis, each block as int8 codes and one
float32 scale, the block's largest magnitude: `M ≈ codes · scale / 127`
(Gupta et al., 2025, arXiv 2509.23106). The blocks depend on the
variable's shape only, not on its layout, so that a checkpoint moves
between layouts; where a layout splits the last axis finer than a block,
XLA reduces a block's scale across the devices that hold it.

The update reads the stored momentum in float32 (`read`), updates it and
stores the result (`stored`); Newton–Schulz sees the step's momentum before
it is rounded. Only Muon's momentum is stored this way: AdamW's moments
and the variants' second moments stay in float32.
"""

import math

import keras
from keras import ops

DTYPES = ("float32", "bfloat16", "int8")
BLOCK = 2048


def checked_momentum_dtype(dtype):
    """`dtype`, or a ValueError naming `momentum_dtype` unless it is one of
    `DTYPES`."""
    if dtype not in DTYPES:
        raise ValueError(
            f"`momentum_dtype` must be one of {DTYPES}. Received: momentum_dtype={dtype!r}"
        )
    return dtype


def block_size(length):
    """The int8 block along a last axis of `length` elements: the largest
    divisor of both `BLOCK` and `length`."""
    return math.gcd(BLOCK, length)


def quantize(x, block):
    """`x` (float32) as int8 codes of its shape and float32 scales of shape
    `x.shape[:-1] + (x.shape[-1] // block,)`, per block of `block`
    consecutive elements along the last axis. A non-finite block's scale is
    not finite, so that `dequantize` gives NaN for it."""
    shape = tuple(x.shape)
    blocks = ops.reshape(x, (*shape[:-1], shape[-1] // block, block))
    scales = ops.max(ops.abs(blocks), axis=-1)
    nonzero = ops.where(scales > 0, scales, ops.ones_like(scales))
    codes = ops.round(blocks * ops.expand_dims(127.0 / nonzero, -1))
    # A NaN code would cast to any integer: 0, the scale keeps the NaN.
    codes = ops.where(ops.isfinite(codes), codes, ops.zeros_like(codes))
    return ops.cast(ops.reshape(codes, shape), "int8"), scales


def dequantize(codes, scales):
    """The float32 values that `quantize` stored as `codes` and `scales`."""
    shape = tuple(codes.shape)
    count = scales.shape[-1]
    blocks = ops.reshape(ops.cast(codes, "float32"), (*shape[:-1], count, shape[-1] // count))
    return ops.reshape(blocks * ops.expand_dims(scales / 127.0, -1), shape)


def read(state):
    """The momentum of `state` (a `VariableState`) in the update's dtype:
    float32 unless it is stored in a wider one (a float64 variable's)."""
    if state.momentum_scales is not None:
        return dequantize(state.momentum, state.momentum_scales)
    if state.momentum.dtype == "bfloat16":
        return ops.cast(state.momentum, "float32")
    return state.momentum


def stored(state, value, after=None):
    """`[(variable, new value)]`: what to assign to store `value` as the
    momentum of `state` (a `VariableState`); on JAX, a rounded momentum
    (bfloat16, int8) computed after the tensor `after` (the step's
    direction, which is read from the old momentum)."""
    momentum, scales = state.momentum, state.momentum_scales
    layout = getattr(momentum, "_layout", None)
    rounded = momentum.dtype in ("bfloat16", "int8")
    if rounded and after is not None and keras.backend.backend() == "jax":
        # XLA reads the old momentum again wherever the direction is used;
        # with the new one free to come first, it copies every variable's
        # old momentum at the start of the update (scratch that grows with
        # the model) rather than write the new one over it. A factor of
        # exactly 1 computed from the direction orders them: where the
        # momentum is whole on each device, only one from all of the
        # direction does; where it is sharded, one element by element does,
        # with no all-reduce.
        if layout and any(layout.axes):
            value = value * ops.cast(ops.logical_not(after > float("inf")), value.dtype)
        else:
            value = value * ops.cast(ops.logical_not(ops.max(after) > float("inf")), value.dtype)
    if scales is None:
        return [(momentum, ops.cast(value, momentum.dtype))]
    codes, new_scales = quantize(value, momentum.shape[-1] // scales.shape[-1])
    return [(momentum, codes), (scales, new_scales)]
