"""How close keras_muon.msign comes to the exact U·Vᵀ, per schedule and steps.

For random matrices whose singular values, after msign's normalisation
(X / ‖X‖_F), reach down to 1e-3 or 1e-2, prints the range of the output
singular values (1 is exact) and the largest entry of |msign(X) − U·Vᵀ|
(U·Vᵀ from a float64 SVD), on the current Keras backend and its default
device, with the iteration in each `--ns-dtype` given (the same matrices
for each).

    KERAS_BACKEND=jax python benchmarks/msign_accuracy.py
    KERAS_BACKEND=jax python benchmarks/msign_accuracy.py --ns-dtype float32 tf32 bfloat16

"float32" multiplies in true float32 on every backend and device; "tf32"
shows what TF32 products (on NVIDIA GPUs from Ampere on) give.
"""

import argparse

import keras
import numpy as np

import keras_muon
from keras_muon.update.newton_schulz import DTYPES
from keras_muon.update.newton_schulz import uses_gram_iteration

SCHEDULES = ("polar_express", "you", "jordan")
STEPS = (5, 6, 7, 8)


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape",
        type=int,
        nargs=2,
        default=(256, 1024),
        help="matrix shape (default 256 1024)",
    )
    parser.add_argument(
        "--matrices", type=int, default=4, help="random matrices per row (default 4)"
    )
    parser.add_argument(
        "--ns-dtype",
        choices=DTYPES,
        nargs="+",
        default=["float32"],
        help="precisions of the iteration, as Muon's ns_dtype (default float32)",
    )
    parser.add_argument(
        "--schedules",
        choices=SCHEDULES,
        nargs="+",
        default=list(SCHEDULES),
        help="ns_coefficients to measure (default all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    device = keras.ops.zeros(()).device
    print(
        f"backend {keras.backend.backend()} on {device}, {args.matrices} float32 "
        f"matrices of shape {tuple(args.shape)}"
    )
    print(HEADER)
    rows = []
    for smallest in (1e-3, 1e-2):
        x = np.stack([test_matrix(rng, *args.shape, smallest) for _ in range(args.matrices)])
        u, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        for ns_dtype in args.ns_dtype:
            for coefficients in args.schedules:
                for steps in STEPS:
                    row = accuracy(x, u @ vt, ns_dtype, coefficients, steps)
                    rows.append({**row, "smallest": smallest})
                    print(
                        f"{ns_dtype:<9} {coefficients:<14} {steps:>5} {row['iteration']:>9} "
                        f"{smallest:>10.0e} {row['sigma min']:>9.3f} "
                        f"{row['sigma max']:>9.3f} {row['max error']:>14.2e}"
                    )
    return rows


HEADER = (
    f"{'ns_dtype':<9} {'schedule':<14} {'steps':>5} {'iteration':>9} {'smallest σ':>10} "
    f"{'σ out min':>9} {'σ out max':>9} {'max |Δ| vs SVD':>14}"
)


def accuracy(x, exact, ns_dtype, coefficients, steps):
    """One row of the table: msign of the matrices `x` against `exact`."""
    out = keras.ops.convert_to_numpy(
        keras_muon.msign(keras.ops.convert_to_tensor(x), steps, coefficients, ns_dtype)
    ).astype(np.float64)
    sigma = np.linalg.svd(out, compute_uv=False)
    gram = uses_gram_iteration(*x.shape[-2:], steps, ns_dtype)
    return {
        "ns_dtype": ns_dtype,
        "schedule": coefficients,
        "steps": steps,
        "iteration": "gram" if gram else "plain",
        "sigma min": float(sigma.min()),
        "sigma max": float(sigma.max()),
        "max error": float(np.abs(out - exact).max()),
    }


if __name__ == "__main__":
    main()
