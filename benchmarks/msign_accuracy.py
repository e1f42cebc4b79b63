"""How close keras_muon.msign comes to the exact U·Vᵀ, per schedule and steps.

For random matrices whose singular values, after msign's normalisation
(X / ‖X‖_F), reach down to 1e-3 or 1e-2, prints the range of the output
singular values (1 is exact) and the largest entry of |msign(X) − U·Vᵀ|
(U·Vᵀ from a float64 SVD), on the current Keras backend and its default
device, with the iteration in `--ns-dtype`.

    KERAS_BACKEND=jax python benchmarks/msign_accuracy.py
    KERAS_BACKEND=jax python benchmarks/msign_accuracy.py --ns-dtype bfloat16

On GPUs, JAX and TensorFlow multiply float32 matrices in TF32 unless told
otherwise; the table then shows what the optimizer gets there.
"""

import argparse

import keras
import numpy as np

import keras_muon
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
    parser.add_argument("--shape", type=int, nargs=2, default=(256, 1024), help="matrix shape (default 256 1024)")
    parser.add_argument("--matrices", type=int, default=4, help="random matrices per row (default 4)")
    parser.add_argument("--ns-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the iteration, as Muon's ns_dtype (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    device = keras.ops.zeros(()).device
    print(
        f"backend {keras.backend.backend()} on {device}, {args.matrices} float32 matrices "
        f"of shape {tuple(args.shape)}, iteration in {args.ns_dtype}"
    )
    print(f"{'schedule':<14} {'steps':>5} {'iteration':>9} {'smallest σ':>10} {'σ out min':>9} {'σ out max':>9} {'max |Δ| vs SVD':>14}")
    rows = []
    for smallest in (1e-3, 1e-2):
        x = np.stack([test_matrix(rng, *args.shape, smallest) for _ in range(args.matrices)])
        u, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        exact = u @ vt
        for coefficients in SCHEDULES:
            for steps in STEPS:
                out = keras.ops.convert_to_numpy(
                    keras_muon.msign(keras.ops.convert_to_tensor(x), steps, coefficients, args.ns_dtype)
                ).astype(np.float64)
                sigma = np.linalg.svd(out, compute_uv=False)
                row = {
                    "schedule": coefficients,
                    "steps": steps,
                    "iteration": "gram" if uses_gram_iteration(*args.shape, steps, args.ns_dtype) else "plain",
                    "smallest": smallest,
                    "sigma min": float(sigma.min()),
                    "sigma max": float(sigma.max()),
                    "max error": float(np.abs(out - exact).max()),
                }
                rows.append(row)
                print(
                    f"{coefficients:<14} {steps:>5} {row['iteration']:>9} {smallest:>10.0e} "
                    f"{row['sigma min']:>9.3f} {row['sigma max']:>9.3f} {row['max error']:>14.2e}"
                )
    return rows


if __name__ == "__main__":
    main()
