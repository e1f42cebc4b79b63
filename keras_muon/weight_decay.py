"""Decoupled weight decay, plain or cautious."""

from keras import ops


def decayed(weights, update, rate, cautious=False):
    """`weights` decayed by `rate` (the learning rate times λ), before the
    step `lr·update` is subtracted.

    Plain decay shrinks every entry: `W·(1 − rate)`. Cautious decay (Chen et
    al., 2025, arXiv 2510.12402) shrinks only the entries where the update
    has the sign of the weight (`update·W ≥ 0`), where the step already
    moves the weight towards zero: `W − rate·1[update·W ≥ 0]·W`. A positive
    rescaling of `update` does not change which entries decay.
    """
    if not cautious:
        return ops.multiply(weights, 1 - rate)
    agrees = ops.greater_equal(ops.multiply(update, weights), 0)
    return ops.where(agrees, ops.multiply(weights, 1 - rate), weights)
