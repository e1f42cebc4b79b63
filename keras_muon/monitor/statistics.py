"""The numbers `MuonMonitor` reports, each a small function of tensors
taken before and after one optimizer step.

Reductions run on the device and stay there (`step_reductions`, a pure
function of tensors, so that TensorFlow can run it as one graph); the
monitor moves their few small arrays to the host once per measurement,
not one number per variable.
"""

import numpy as np
from keras import ops

from keras_muon.update import rule
from keras_muon.update.newton_schulz import msign


def copies(tensors):
    """A copy of each of `tensors`, taken now: TensorFlow and torch change
    variables in place, and JAX's `fit` donates its state's buffers to the
    next step."""
    return [ops.copy(t) for t in tensors]


def squared_norms(tensors):
    """`‖t‖²` of each of `tensors`, summed in float32: a float32 tensor of
    shape `(len(tensors),)`, left on the device."""
    if not tensors:
        return ops.zeros((0,), "float32")
    return ops.stack([ops.sum(ops.square(ops.cast(t, "float32"))) for t in tensors])


def finite(tensors):
    """Whether every entry of each of `tensors` is finite: a bool tensor of
    shape `(len(tensors),)`, left on the device."""
    if not tensors:
        return ops.zeros((0,), "bool")
    return ops.stack([ops.all(ops.isfinite(t)) for t in tensors])


def step_reductions(before, after, moments):
    """Everything a measured step reduces on the device, in one call.

    Args:
        before: The value of each trained variable before the step.
        after: The same variables' values after it, in the same order.
        moments: The first moment of each variable the optimizer updates.

    Returns:
        `(update_squares, weight_squares, finite)`, three tensors:
        `‖after − before‖²` and `‖after‖²` of each variable (float32; the
        difference taken in the variable's dtype, as the step changed it),
        and whether every entry of each moment is finite.
    """
    updates = [a - b for a, b in zip(after, before)]
    return squared_norms(updates), squared_norms(after), finite(moments)


def route_statistics(sizes, update_squares, weight_squares):
    """The step of one route's variables against their weights.

    Args:
        sizes: Number of entries of each variable.
        update_squares: `‖ΔW‖²` of each variable over the step.
        weight_squares: `‖W‖²` of each variable after the step.

    Returns:
        `(statistics, ratios)`: `update_rms` and `weight_rms` over all the
        route's entries, `update_ratio` (the first over the second), and
        the smallest and largest per-variable ratio `rms(ΔW)/rms(W)`
        (`min_variable_ratio`, `max_variable_ratio`; variables whose
        weights are all zero have none); and the per-variable ratios, NaN
        where undefined.
    """
    sizes = np.asarray(sizes, np.float64)
    update_rms = np.sqrt(np.sum(update_squares) / np.sum(sizes))
    weight_rms = np.sqrt(np.sum(weight_squares) / np.sum(sizes))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(weight_squares > 0, np.sqrt(update_squares / weight_squares), np.nan)
    defined = ratios[~np.isnan(ratios)]
    statistics = {
        "update_rms": float(update_rms),
        "weight_rms": float(weight_rms),
        "update_ratio": float(update_rms / weight_rms) if weight_rms > 0 else float("nan"),
        "min_variable_ratio": float(np.min(defined)) if defined.size else float("nan"),
        "max_variable_ratio": float(np.max(defined)) if defined.size else float("nan"),
    }
    return statistics, ratios


def orthogonalized_direction(momentum_before, momentum_after, beta, nesterov):
    """The direction `N` that Muon orthogonalized in the step that took its
    momentum from `M₀` to `M₁ = β·M₀ + G`: the gradient is recovered as
    `G = M₁ − β·M₀`, and `N` follows from it as in the update
    (`rule.momentum_and_direction`)."""
    gradient = momentum_after - beta * momentum_before
    return rule.momentum_and_direction(momentum_before, gradient, beta, nesterov)[1]


def sample(count, total):
    """`count` indices spread evenly over `range(total)` (all if fewer)."""
    if total <= count:
        return list(range(total))
    return sorted({int(i) for i in np.linspace(0, total - 1, count).round()})


# Newton–Schulz schedules are built to map singular values from about 1e-3
# of the input's Frobenius norm upwards close to 1 (Polar Express: [1e-3, 1]).
# Below that lie directions the gradient does not have, such as the mean of
# the residual stream that LayerNorm removes: msign leaves them near zero.
DESIGN_FLOOR = 1e-3


def singular_value_range(optimizer, blocks, floor=DESIGN_FLOOR):
    """How well msign, as `optimizer` computes it (its variant's input,
    steps, schedule and dtype), orthogonalized `blocks` `(n, d_in, d_out)`.

    Returns:
        `(smallest, largest)`: the smallest `‖O·v‖` over the right singular
        vectors `v` of the input `X` whose singular value is at least
        `floor·‖X‖_F` (the range the schedules are built for; exactly
        `p(σ)`, the schedule's polynomial, for an exact iteration), and
        the largest singular value of `O`. By SVD in float64.
    """
    x = optimizer._orthogonalization_input(blocks)
    orthogonal = msign(x, optimizer.ns_steps, optimizer.ns_coefficients, optimizer.ns_dtype)
    x = ops.convert_to_numpy(ops.cast(x, "float32")).astype(np.float64)
    orthogonal = ops.convert_to_numpy(ops.cast(orthogonal, "float32")).astype(np.float64)
    return singular_value_range_of(x, orthogonal, floor)


def singular_value_range_of(x, orthogonal, floor=DESIGN_FLOOR):
    """`singular_value_range` for an input `x` and its msign `orthogonal`,
    NumPy arrays `(n, d_in, d_out)`."""
    smallest, largest = np.inf, 0.0
    for block, o in zip(x, orthogonal):
        _, sigma, v = np.linalg.svd(block, full_matrices=False)
        kept = sigma >= floor * np.linalg.norm(block)
        if kept.any():
            smallest = min(smallest, np.min(np.linalg.norm(o @ v[kept].T, axis=0)))
        largest = max(largest, np.linalg.norm(o, 2))
    return float(smallest), float(largest)
