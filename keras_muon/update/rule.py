"""The element-wise formulas of Muon, its variants and its AdamW side.

Each function is one line of the equations in `Muon`'s docstring, on
tensors of any backend. `Muon._update` calls them in the order of those
equations, and `backends/torch_foreach.py` has a multi-tensor twin of each
formula that the torch backend runs instead (same name, same order of
operations; `tests/backends/test_torch_foreach.py` checks each pair).

Shapes: a Muon variable is read as blocks `(num_blocks, d_in, d_out)` (see
`routing.views.MatrixView`): `d_in` is the side the layer reads (`x` in
`y = x·W`), `d_out` the side it writes. A Keras `Dense` kernel is stored
`(d_in, d_out)`, the transpose of torch's `(out, in)`.
"""

import math

from keras import ops

from keras_muon.arguments import Default
from keras_muon.arguments import boolean
from keras_muon.arguments import optional_number

SCALES = ("moonlight", "jordan", "mup", "naive")
# The update RMS of the "moonlight" scale and of AdaMuon: that of a typical
# AdamW update, so that AdamW's learning rate and weight decay carry over.
DEFAULT_RMS_RATE = 0.2
NEURON_AXES = ("longer", "output")


def momentum_and_direction(momentum, gradient, beta, nesterov):
    """`M ← β·M + G` and the direction to orthogonalize: `β·M + G` with
    Nesterov momentum, else `M`.

    Returns:
        `(new M, direction)`.
    """
    momentum = ops.add(ops.multiply(momentum, beta), gradient)
    if nesterov:
        return momentum, ops.add(ops.multiply(momentum, beta), gradient)
    return momentum, momentum


def adamw_moments(m, v, gradient, beta_1, beta_2):
    """AdamW's moments: `m + (g − m)·(1 − β₁)` and `v + (g² − v)·(1 − β₂)`.

    Returns:
        `(new m, new v)`.
    """
    m = ops.add(m, ops.multiply(ops.subtract(gradient, m), 1 - beta_1))
    v = ops.add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - beta_2))
    return m, v


def adamw_step(m, v, lr, step, beta_1, beta_2, epsilon):
    """AdamW's step before weight decay, `lr·α·m / (sqrt(v) + ε)` with
    `α = sqrt(1 − β₂ᵗ) / (1 − β₁ᵗ)`, epsilon outside the bias correction as
    Keras writes it. `lr` and `step` (`t`, from 1) are scalars of `m`'s
    dtype; the betas are Python floats."""
    beta_1 = ops.cast(beta_1, m.dtype)
    beta_2 = ops.cast(beta_2, m.dtype)
    alpha = lr * ops.sqrt(1 - ops.power(beta_2, step)) / (1 - ops.power(beta_1, step))
    return ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), epsilon))


def decayed(weights, update, rate, cautious=False):
    """`weights` after decoupled weight decay at `rate` (the learning rate
    times λ), before the step `lr·update` is subtracted.

    Plain decay shrinks every entry: `W·(1 − rate)`. Cautious decay (Chen
    et al., 2025, arXiv 2510.12402) shrinks only the entries where the
    update has the sign of the weight (`update·W ≥ 0`), where the step
    already moves the weight towards zero. A positive rescaling of
    `update` does not change which entries decay.
    """
    if not cautious:
        return ops.multiply(weights, 1 - rate)
    agrees = ops.greater_equal(ops.multiply(update, weights), 0)
    return ops.where(agrees, ops.multiply(weights, 1 - rate), weights)


def descended(weights, update, step_size):
    """`W − step_size·U`: the last line of the Muon update, with
    `step_size = lr·s` one scalar, so that the factors round once."""
    return ops.subtract(weights, ops.multiply(update, step_size))


def hyperball(weights, update, radius, lr):
    """Hyperball's step (Wen et al., 2026, arXiv 2606.16899) of blocks
    `(num_blocks, d_in, d_out)`: `W_b ← R_b·normalize(W_b − lr·R_b·Û_b)`,
    `Û_b = normalize(U_b)`, `normalize(X) = X/‖X‖_F`. The step is `lr`
    times the radius `R_b` `(num_blocks,)` and the result is back on the
    sphere, so `lr` is the relative size of a step. A zero update leaves
    the block where it is.

    Returns the new blocks and the radii. A radius not yet set (0) is the
    block's norm now: the radii start at 0 and are set at the first
    update, so that they are the norms of the weights the optimizer
    trains, loaded after it was built or not; a checkpoint brings them
    set."""
    radius = ops.convert_to_tensor(radius)
    radius = ops.where(ops.greater(radius, 0), radius, block_norms(weights))
    radii = ops.reshape(radius, (-1, 1, 1))
    step = ops.multiply(update, lr * radii * _inverse_sqrt(_squared_norm(update)))
    moved = ops.subtract(weights, step)
    return ops.multiply(moved, radii * _inverse_sqrt(_squared_norm(moved))), radius


def block_norms(blocks):
    """The Frobenius norm of each block of `(num_blocks, d_in, d_out)`, as
    `(num_blocks,)`."""
    return ops.reshape(ops.sqrt(_squared_norm(blocks)), (-1,))


def checked_weight_decay(weight_decay, hyperball):
    """`(weight decay of Muon's variables, hyperball)` from the arguments:
    no weight decay under Hyperball, whose radius replaces it; a ValueError
    naming the argument for a wrong value, or for a non-zero `weight_decay`
    given (not left to its `Default`) with `hyperball=True`."""
    given = not isinstance(weight_decay, Default)
    weight_decay = optional_number("weight_decay", weight_decay, minimum=0.0)
    if not boolean("hyperball", hyperball):
        return weight_decay, False
    if not (given and weight_decay):
        return None, True
    raise ValueError(
        "`hyperball=True` keeps each Muon matrix at its norm in place of weight "
        "decay: leave `weight_decay` out, or set it to 0 or None. Received: "
        f"weight_decay={weight_decay!r} with hyperball=True"
    )


def update_scale(scale, d_in, d_out, rms_rate=DEFAULT_RMS_RATE):
    """The factor `s` applied to `msign(M)` of one `(d_in, d_out)` block.

    Args:
        scale: One of
            - `"moonlight"`: `rms_rate·sqrt(max(d_in, d_out))`, which gives
              the update the RMS of a typical AdamW update, so Adam's
              learning rate and weight decay carry over (Liu et al., 2025).
              `rms_rate=None` means a factor of 1, as in
              `keras.optimizers.Muon`.
            - `"jordan"`: `sqrt(max(1, d_out / d_in))` (Jordan et al., 2024).
            - `"mup"`: `sqrt(d_out / d_in)`, the spectral-norm condition for
              learning-rate transfer across widths (Yang et al., 2023).
            - `"naive"`: 1.
        d_in: Input dimension of the block.
        d_out: Output dimension of the block.
        rms_rate: Target update RMS of the `"moonlight"` scale.

    Returns:
        A Python float.
    """
    if scale == "moonlight":
        return 1.0 if rms_rate is None else rms_rate * math.sqrt(max(d_in, d_out))
    if scale == "jordan":
        return math.sqrt(max(1.0, d_out / d_in))
    if scale == "mup":
        return math.sqrt(d_out / d_in)
    if scale == "naive":
        return 1.0
    raise ValueError(f"`scale` must be one of {SCALES}. Received: scale={scale!r}")


def checked_scale(scale, rms_rate):
    """`scale`, or a ValueError naming the argument if it is unknown, or if
    `rms_rate` is set away from its default for a scale that ignores it."""
    update_scale(scale, 1, 1, rms_rate)
    if scale != "moonlight" and rms_rate != DEFAULT_RMS_RATE:
        raise ValueError(
            f"`rms_rate` is used only by scale='moonlight'. Received: "
            f"rms_rate={rms_rate!r} with scale={scale!r}"
        )
    return scale


def neuron_state_shape(num_blocks, d_in, d_out, neuron_axis):
    """The shape of NorMuon's second moment: one entry per neuron of each
    block, `(num_blocks, 1, d_out)` for output neurons and
    `(num_blocks, d_in, 1)` for input neurons.

    `neuron_axis="output"` takes the output features as neurons;
    `"longer"` the longer side of the block (output on a tie).
    """
    if neuron_axis not in NEURON_AXES:
        raise ValueError(
            f"`neuron_axis` must be one of {NEURON_AXES}. Received: neuron_axis={neuron_axis!r}"
        )
    if neuron_axis == "longer" and d_in > d_out:
        return (num_blocks, d_in, 1)
    return (num_blocks, 1, d_out)


def normuon(orthogonal, second_moment, beta_2):
    """NorMuon's per-neuron normalization (Li et al., 2025) of
    orthogonalized blocks `O` `(num_blocks, d_in, d_out)`.

    `v ← β₂·v + (1 − β₂)·mean(O ⊙ O)` over the axis that `second_moment`
    has size 1 on; `Ô = O / sqrt(v)`, rescaled to the Frobenius norm of `O`
    block by block, so that the update has Muon's size. A zero block or a
    zero neuron gives a zero update, never NaN.

    Returns:
        `(Ô, v)`.
    """
    reduce_axis = -2 if second_moment.shape[-2] == 1 else -1
    mean_square = ops.mean(ops.square(orthogonal), axis=reduce_axis, keepdims=True)
    second_moment = ops.add(
        ops.multiply(second_moment, beta_2), ops.multiply(mean_square, 1 - beta_2)
    )
    normalized = ops.multiply(orthogonal, _inverse_sqrt(second_moment))
    # ‖O‖_F / ‖Ô‖_F, 0 for a zero block.
    ratio = ops.multiply(
        ops.sqrt(_squared_norm(orthogonal)), _inverse_sqrt(_squared_norm(normalized))
    )
    return ops.multiply(normalized, ratio), second_moment


def adamuon(orthogonal, second_moment, beta_2, epsilon=1e-8):
    """AdaMuon's element-wise normalization (Si et al., 2025) of
    orthogonalized blocks `O` `(num_blocks, d_in, d_out)`.

    `V ← β₂·V + (1 − β₂)·O ⊙ O`, `Ô = O / (sqrt(V) + ε)`, scaled to unit
    Frobenius norm per block (the caller multiplies by
    `rms_rate·sqrt(d_in·d_out)` for an update of RMS `rms_rate`). A zero
    block gives a zero update.

    Returns:
        `(Ô / ‖Ô‖_F, V)`.
    """
    second_moment = ops.add(
        ops.multiply(second_moment, beta_2), ops.multiply(ops.square(orthogonal), 1 - beta_2)
    )
    normalized = ops.divide(orthogonal, ops.add(ops.sqrt(second_moment), epsilon))
    return ops.multiply(normalized, _inverse_sqrt(_squared_norm(normalized))), second_moment


def _inverse_sqrt(x):
    """`1/sqrt(x)` where `x > 0`, else 0."""
    positive = ops.greater(x, 0)
    return ops.where(positive, ops.rsqrt(ops.where(positive, x, 1.0)), 0.0)


def _squared_norm(blocks):
    """The squared Frobenius norm of each block, `(num_blocks, 1, 1)`."""
    return ops.sum(ops.square(blocks), axis=(-2, -1), keepdims=True)
