"""A float64 NumPy reference of the Muon update, written from the formulas.

Blocks are `(..., d_in, d_out)` arrays; tests build them from Keras kernels
with their own NumPy reshapes, independently of `keras_muon.MatrixView`.
"""

import numpy as np


def newton_schulz(x, schedule):
    """Newton–Schulz iteration with the given `(a, b, c)` per step."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=(-2, -1), keepdims=True)
    x = x / np.where(norm > 0, norm, 1.0)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = np.swapaxes(x, -1, -2)
    for a, b, c in schedule:
        gram = x @ np.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return np.swapaxes(x, -1, -2) if tall else x


def svd_msign(x):
    """The exact orthogonal polar factor `U·Vᵀ`."""
    u, _, vt = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
    return u @ vt


def composed_polynomial(sigma, schedule):
    """Where the iteration sends each normalised singular value."""
    sigma = np.asarray(sigma, dtype=np.float64)
    for a, b, c in schedule:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


def scale(version, d_in, d_out, rms_rate=0.2):
    return {
        "naive": 1.0,
        "jordan": np.sqrt(max(1.0, d_out / d_in)),
        "mup": np.sqrt(d_out / d_in),
        "moonlight": rms_rate * np.sqrt(max(d_in, d_out)),
    }[version]


def decay(w, update, rate, cautious=False):
    """Decoupled weight decay at `rate` (lr·λ); cautious: only where
    `update·w >= 0`."""
    if cautious:
        return w - rate * (update * w >= 0) * w
    return w - rate * w


def muon_step(w, m, g, *, lr, momentum, nesterov, weight_decay, scale, schedule, cautious=False):
    """One Muon step on blocks `w` (..., d_in, d_out); returns (w, m)."""
    w, m, _ = muon_family_step(
        w,
        m,
        None,
        g,
        rule="muon",
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        scale=scale,
        schedule=schedule,
        cautious=cautious,
    )
    return w, m


def normuon_second_moment_shape(d_in, d_out, neuron_axis):
    """NorMuon's state per block: per output neuron `(1, d_out)`, or per
    input neuron `(d_in, 1)` when the input side is the longer one."""
    if neuron_axis == "longer" and d_in > d_out:
        return (d_in, 1)
    return (1, d_out)


def _where_positive(x, f):
    """`f(x)` where `x > 0`, else 0."""
    safe = np.where(x > 0, x, 1.0)
    return np.where(x > 0, f(safe), 0.0)


def hyperball_step(w, update, radius, lr):
    """Hyperball on blocks `w` (..., d_in, d_out) with radii `radius` (...):
    the step `lr·R` along the normalized update, back onto the sphere."""
    radius = np.asarray(radius, np.float64)[..., None, None]
    moved = w - lr * radius * update / np.linalg.norm(update, axis=(-2, -1), keepdims=True)
    return radius * moved / np.linalg.norm(moved, axis=(-2, -1), keepdims=True)


def muon_family_step(
    w,
    m,
    state,
    g,
    *,
    rule,
    lr,
    momentum,
    nesterov,
    weight_decay,
    schedule,
    scale=1.0,
    beta_2=0.95,
    sign_input=True,
    rms_rate=0.2,
    cautious=False,
    radius=None,
):
    """One step of Muon (`rule="muon"`), NorMuon (`"normuon"`) or AdaMuon
    (`"adamuon"`) on blocks `w` (..., d_in, d_out); returns (w, m, state).

    NorMuon's `state` is `(..., 1, d_out)` or `(..., d_in, 1)`: its second
    moment is averaged over the axis of size 1. AdaMuon's is `w`'s shape.
    With Hyperball's `radius` (one per block), no weight decay.
    """
    m = momentum * m + g
    direction = momentum * m + g if nesterov else m
    if rule == "adamuon" and sign_input:
        direction = np.sign(direction)
    o = newton_schulz(direction, schedule)
    norm = np.linalg.norm(o, axis=(-2, -1), keepdims=True)
    if rule == "normuon":
        axis = -2 if state.shape[-2] == 1 else -1
        state = beta_2 * state + (1 - beta_2) * np.mean(o * o, axis=axis, keepdims=True)
        o = o * _where_positive(state, lambda v: 1 / np.sqrt(v))
        o = o * _where_positive(np.linalg.norm(o, axis=(-2, -1), keepdims=True), lambda n: norm / n)
    elif rule == "adamuon":
        state = beta_2 * state + (1 - beta_2) * o * o
        o = o / (np.sqrt(state) + 1e-8)
        o = o * _where_positive(np.linalg.norm(o, axis=(-2, -1), keepdims=True), lambda n: 1 / n)
        scale = rms_rate * np.sqrt(w.shape[-2] * w.shape[-1])
    update = scale * o
    if radius is not None:
        return hyperball_step(w, update, radius, lr), m, state
    return decay(w, update, lr * weight_decay, cautious) - lr * update, m, state


def adamw_step(w, m, v, g, *, step, lr, beta_1, beta_2, epsilon, weight_decay, cautious=False):
    """One AdamW step as Keras writes it (epsilon outside the bias correction)."""
    m = m + (g - m) * (1 - beta_1)
    v = v + (g * g - v) * (1 - beta_2)
    alpha = lr * np.sqrt(1 - beta_2**step) / (1 - beta_1**step)
    update = m * alpha / (np.sqrt(v) + epsilon)
    return decay(w, update, lr * weight_decay, cautious) - update, m, v


def head_max_logits(query, key, scale, mask=None):
    """QK-Clip's statistic: the largest `q·k·scale` per query head over
    the batch and the allowed positions. `query` is `(b, t, hq, d)`, `key`
    `(b, s, hk, d)`; query head `h` uses key head `h // (hq / hk)`."""
    query, key = np.asarray(query, np.float64), np.asarray(key, np.float64)
    group = query.shape[2] // key.shape[2]
    key = np.repeat(key, group, axis=2)
    logits = np.einsum("bthd,bshd->bhts", query, key) * scale
    if mask is not None:
        allowed = np.broadcast_to(np.asarray(mask, bool), (query.shape[0], *logits.shape[2:]))
        logits = np.where(allowed[:, None], logits, -np.inf)
    return logits.max(axis=(0, 2, 3))


def qk_clip_factors(max_logits, threshold, alpha, group):
    """The factors of each query head and key head: every head's logits
    scaled by exactly `γ_h = min(1, τ/S_h)`, the key by `γ_g^(1−α)` with
    `γ_g` the smallest `γ` of its group."""
    gamma = np.where(max_logits > threshold, threshold / max_logits, 1.0)
    group_gamma = gamma.reshape(-1, group).min(axis=1)
    key = group_gamma ** (1 - alpha)
    return gamma / np.repeat(key, group), key
