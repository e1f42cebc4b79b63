"""How close keras_muon.msign comes to the exact U·Vᵀ, per schedule and steps.

For random matrices whose singular values, after msign's normalisation
(X / ‖X‖_F), reach down to 1e-3 or 1e-2, prints the range of the output
singular values (1 is exact) and the largest entry of |msign(X) − U·Vᵀ|
(U·Vᵀ from a float64 SVD), on the current Keras backend.

    KERAS_BACKEND=jax python benchmarks/msign_accuracy.py
"""

import argparse

import keras
import numpy as np

import keras_muon


def test_matrix(rng, rows, columns, smallest):
    """A float32 matrix whose normalised singular values reach `smallest`."""
    n = min(rows, columns)
    low = smallest
    for _ in range(100):  # fixed point: σ_min / ‖σ‖₂ = smallest
        low = smallest * np.linalg.norm(np.geomspace(low, 1.0, n))
    sigma = np.geomspace(low, 1.0, n)
    u, _ = np.linalg.qr(rng.normal(size=(rows, n)))
    v, _ = np.linalg.qr(rng.normal(size=(columns, n)))
    return ((u * sigma) @ v.T).astype("float32")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(256, 1024), help="matrix shape (default 256 1024)")
    parser.add_argument("--matrices", type=int, default=4, help="random matrices per row (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    print(f"backend {keras.backend.backend()}, {args.matrices} matrices of shape {tuple(args.shape)}, float32")
    print(f"{'schedule':<14} {'steps':>5} {'smallest σ':>10} {'σ out min':>9} {'σ out max':>9} {'max |Δ| vs SVD':>14}")
    for smallest in (1e-3, 1e-2):
        x = np.stack([test_matrix(rng, *args.shape, smallest) for _ in range(args.matrices)])
        u, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        exact = u @ vt
        for coefficients in ("polar_express", "you", "jordan"):
            for steps in (5, 6, 7, 8):
                out = keras.ops.convert_to_numpy(
                    keras_muon.msign(keras.ops.convert_to_tensor(x), steps, coefficients)
                ).astype(np.float64)
                sigma = np.linalg.svd(out, compute_uv=False)
                print(
                    f"{coefficients:<14} {steps:>5} {smallest:>10.0e} {sigma.min():>9.3f} "
                    f"{sigma.max():>9.3f} {np.abs(out - exact).max():>14.2e}"
                )


if __name__ == "__main__":
    main()
