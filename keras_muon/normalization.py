"""Second-moment normalisations of orthogonalized updates (NorMuon, AdaMuon).

Each function takes orthogonalized blocks `O` of shape
`(num_blocks, d_in, d_out)` in float32 and the running second moment, and
returns the normalised blocks and the new second moment. A zero block or
a zero row (a neuron that never had a gradient) gives a zero update, never
NaN.
"""

from keras import ops

NEURON_AXES = ("longer", "output")


def neuron_state_shape(num_blocks, d_in, d_out, neuron_axis):
    """The shape of NorMuon's second moment: one entry per neuron of each
    block, `(num_blocks, 1, d_out)` for output neurons and
    `(num_blocks, d_in, 1)` for input neurons.

    `neuron_axis="output"` takes the output features as neurons;
    `"longer"` the longer side of the block (output on a tie).
    """
    if neuron_axis not in NEURON_AXES:
        raise ValueError(
            f"`neuron_axis` must be one of {NEURON_AXES}. "
            f"Received: neuron_axis={neuron_axis!r}"
        )
    if neuron_axis == "longer" and d_in > d_out:
        return (num_blocks, d_in, 1)
    return (num_blocks, 1, d_out)


def _inverse_sqrt(x):
    """`1/sqrt(x)` where `x > 0`, else 0."""
    positive = ops.greater(x, 0)
    return ops.where(positive, ops.rsqrt(ops.where(positive, x, 1.0)), 0.0)


def _squared_norm(blocks):
    """The squared Frobenius norm of each block, `(num_blocks, 1, 1)`."""
    return ops.sum(ops.square(blocks), axis=(-2, -1), keepdims=True)


def normuon(orthogonal, second_moment, beta_2):
    """NorMuon's per-neuron normalisation (Li et al., 2025).

    `v ← β₂·v + (1 − β₂)·mean(O ⊙ O)` over the axis that `second_moment`
    has size 1 on; `Ô = O / sqrt(v)`, rescaled to the Frobenius norm of `O`
    block by block, so that the update has Muon's size.

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
    """AdaMuon's element-wise normalisation (Si et al., 2025).

    `V ← β₂·V + (1 − β₂)·O ⊙ O`, `Ô = O / (sqrt(V) + ε)`, scaled to unit
    Frobenius norm per block (the caller multiplies by
    `rms_rate·sqrt(d_in·d_out)` for an update of RMS `rms_rate`).

    Returns:
        `(Ô / ‖Ô‖_F, V)`.
    """
    second_moment = ops.add(
        ops.multiply(second_moment, beta_2), ops.multiply(ops.square(orthogonal), 1 - beta_2)
    )
    normalized = ops.divide(orthogonal, ops.add(ops.sqrt(second_moment), epsilon))
    return ops.multiply(normalized, _inverse_sqrt(_squared_norm(normalized))), second_moment
