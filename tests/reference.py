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


def muon_step(w, m, g, *, lr, momentum, nesterov, weight_decay, scale, schedule):
    """One Muon step on blocks `w` (..., d_in, d_out); returns (w, m)."""
    m = momentum * m + g
    direction = momentum * m + g if nesterov else m
    update = scale * newton_schulz(direction, schedule)
    return w - lr * (update + weight_decay * w), m


def adamw_step(w, m, v, g, *, step, lr, beta_1, beta_2, epsilon, weight_decay):
    """One AdamW step as Keras writes it (epsilon outside the bias correction)."""
    m = m + (g - m) * (1 - beta_1)
    v = v + (g * g - v) * (1 - beta_2)
    alpha = lr * np.sqrt(1 - beta_2**step) / (1 - beta_1**step)
    return w - m * alpha / (np.sqrt(v) + epsilon) - lr * weight_decay * w, m, v
