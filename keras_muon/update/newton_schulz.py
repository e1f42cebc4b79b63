"""msign (the orthogonal polar factor) by Newton–Schulz iteration.

`msign(X) = U·Vᵀ` for `X = U·Σ·Vᵀ`. Each Newton–Schulz step applies the odd
quintic `p(σ) = a·σ + b·σ³ + c·σ⁵` to every singular value at the cost of three
matrix products (smaller ones for wide matrices iterated on their Gram
matrix); a schedule is the list of `(a, b, c)` used step by step.
"""

import functools
import math
import numbers

import keras
from keras import ops

# Keller Jordan's single quintic, tuned for the largest slope at zero.
JORDAN = ((3.4445, -4.7750, 2.0315),)

# Five quintics from Cesista, You et al. (2025); close to 1 from 1e-2 upwards.
YOU = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# Polar Express (Amsel et al. 2025), optimal for singular values in [1e-3, 1].
# The last entry is the fixed point and repeats for longer schedules.
POLAR_EXPRESS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# Polar Express guards against round-off by evaluating each polynomial but
# the fixed point at σ/1.01, and by normalising with 1.01·‖X‖_F.
_POLAR_EXPRESS_SAFETY = 1.01

SCHEDULES = ("polar_express", "jordan", "you")
# The precisions the iteration runs in (`ns_dtype`, see `matmul`); the
# normalization is always float32.
DTYPES = ("float32", "tf32", "bfloat16", "float16")


def _evaluated_at(coefficients, factor):
    """The coefficients of `σ ↦ p(σ / factor)`."""
    a, b, c = coefficients
    return (a / factor, b / factor**3, c / factor**5)


def _polar_express(steps):
    safety = _POLAR_EXPRESS_SAFETY
    table = [_evaluated_at(abc, safety) for abc in POLAR_EXPRESS[:-1]]
    table.append(POLAR_EXPRESS[-1])
    schedule = _extend(table, steps)
    # Fold the normalisation margin into the first polynomial, so that every
    # schedule starts from X / ‖X‖_F.
    schedule[0] = _evaluated_at(schedule[0], safety)
    return schedule


def _extend(table, steps):
    """The first `steps` entries of `table`, its last entry repeated."""
    table = list(table)
    return table[:steps] + table[-1:] * (steps - len(table))


def coefficient_schedule(coefficients="polar_express", steps=5):
    """The `(a, b, c)` of each Newton–Schulz step, as a tuple of length `steps`.

    Args:
        coefficients: `"polar_express"`, `"jordan"`, `"you"`, one `(a, b, c)`
            triple, or a sequence of triples applied in order. A sequence
            shorter than `steps` repeats its last triple; a longer one is an
            error, since its tail would be ignored.
        steps: Number of Newton–Schulz steps, an integer >= 1.

    Returns:
        A tuple of `steps` tuples of three Python floats.

    Raises:
        ValueError: for an unknown name, a malformed triple, non-finite
            coefficients, more triples than `steps`, or a schedule that
            diverges (sends a singular value in [0, 1] above 2).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"`ns_steps` must be an integer >= 1. Received: ns_steps={steps!r}")
    steps = int(steps)
    if isinstance(coefficients, str):
        if coefficients == "polar_express":
            return tuple(_polar_express(steps))
        if coefficients == "jordan":
            return tuple(_extend(JORDAN, steps))
        if coefficients == "you":
            return tuple(_extend(YOU, steps))
        raise ValueError(
            f"`ns_coefficients` must be one of {SCHEDULES} or a sequence of "
            f"(a, b, c) triples. Received: ns_coefficients={coefficients!r}"
        )
    triples = _as_triples(coefficients)
    if len(triples) > steps:
        raise ValueError(
            f"`ns_coefficients` has {len(triples)} (a, b, c) triples but "
            f"`ns_steps` is {steps}; the extra triples would never be used. "
            f"Received: ns_coefficients={coefficients!r}"
        )
    schedule = tuple(_extend(triples, steps))
    _check_bounded(schedule)
    return schedule


def _check_bounded(schedule):
    """Raises if the iteration sends a singular value in [0, 1] above 2."""
    sigma = [i / 1000 for i in range(1001)]
    for step, (a, b, c) in enumerate(schedule, start=1):
        sigma = [a * s + b * s**3 + c * s**5 for s in sigma]
        largest = max(abs(s) for s in sigma)
        if largest > 2:
            raise ValueError(
                f"`ns_coefficients` diverge: after step {step}, a singular "
                f"value in [0, 1] becomes {largest:.3g}; Newton–Schulz "
                "needs them to approach 1."
            )


def _as_triples(coefficients):
    malformed = ValueError(
        "`ns_coefficients` must be a name, one (a, b, c) triple of finite "
        "numbers, or a non-empty sequence of such triples. "
        f"Received: ns_coefficients={coefficients!r}"
    )
    try:
        items = list(coefficients)
    except TypeError:
        raise malformed from None
    if len(items) == 3 and all(_is_number(v) for v in items):
        items = [items]
    if not items:
        raise malformed
    triples = []
    for item in items:
        try:
            triple = tuple(item)
        except TypeError:
            raise malformed from None
        if len(triple) != 3 or not all(_is_number(v) for v in triple):
            raise malformed
        triples.append(tuple(float(v) for v in triple))
    return triples


def _is_number(value):
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def checked_dtype(dtype):
    """`dtype`, or a ValueError naming `ns_dtype` unless it is None or one
    of `DTYPES`."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(
            f"`ns_dtype` must be None or one of {DTYPES}. Received: ns_dtype={dtype!r}"
        )
    return dtype


def iterate_dtype(dtype):
    """The dtype the iterates of precision `dtype` are stored in: float32
    for None, "float32" and "tf32"."""
    return "float32" if dtype in (None, "tf32") else dtype


def msign(x, steps=5, coefficients="polar_express", dtype=None):
    """Orthogonalizes the last two axes of `x` by Newton–Schulz iteration.

    Approximates `U·Vᵀ` for the SVD `x = U·Σ·Vᵀ`, batched over all leading
    axes. Each matrix is first scaled to unit Frobenius norm in float32; the
    scaling is exact for any finite input (it divides by the largest
    magnitude first), so a matrix of 1e-18s and one of 1e12s give the same
    result, and an all-zero matrix gives zeros. Tall matrices are iterated
    transposed, so the Gram matrix is the smaller of the two; in float32,
    matrices more than 1.5 times as wide as tall are iterated on it (see
    `newton_schulz`).

    With the default Polar Express schedule, 5 steps map normalised singular
    values in [1e-3, 1] into about [0.84, 1.12], and 7 or more steps to
    within 1e-5 of 1.

    Args:
        x: Tensor of rank >= 2.
        steps: Number of Newton–Schulz steps.
        coefficients: Schedule name or `(a, b, c)` triples; see
            `coefficient_schedule`.
        dtype: Precision of the iteration, one of `DTYPES` (see `matmul`):
            `None` or `"float32"` (true float32 products on every backend
            and device), `"tf32"`, `"bfloat16"` or `"float16"`.
            Normalisation is always float32.

    Returns:
        A tensor of the shape and dtype of `x`.

    References:
        - [Jordan et al., 2024](https://kellerjordan.github.io/posts/muon/)
        - [Amsel et al., 2025](https://arxiv.org/abs/2505.16932)
    """
    schedule = coefficient_schedule(coefficients, steps)
    checked_dtype(dtype)
    if len(x.shape) < 2:
        raise ValueError(f"msign needs a tensor of rank >= 2. Received shape {x.shape}")
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = ops.swapaxes(x, -1, -2)
    x = newton_schulz(x, schedule, dtype)
    return ops.swapaxes(x, -1, -2) if tall else x


def newton_schulz(x, schedule, dtype=None):
    """`msign` of wide matrices, for a schedule from `coefficient_schedule`.

    The core that `msign` and the optimizer share: `x` has shape
    `(..., rows, cols)` with `rows <= cols`. In float32, matrices more than
    1.5 times as wide as tall are iterated on their Gram matrix (see
    `_gram_iteration`), which needs fewer FLOPs there; `newton_schulz_flops`
    counts them.
    """
    rows, cols = x.shape[-2], x.shape[-1]
    if rows > cols:
        raise ValueError(f"newton_schulz needs rows <= cols. Received shape {x.shape}")
    input_dtype = x.dtype
    x = ops.cast(_normalize(ops.cast(x, "float32")), iterate_dtype(dtype))
    eye = ops.eye(rows, dtype=x.dtype)
    if uses_gram_iteration(rows, cols, len(schedule), dtype):
        x = _gram_iteration(x, schedule, eye, dtype)
    else:
        x = _plain_iteration(x, schedule, eye, dtype)
    return ops.cast(x, input_dtype)


def uses_gram_iteration(rows, cols, steps, dtype=None):
    """Whether `newton_schulz` iterates a `(rows, cols)` matrix on its Gram
    matrix: with float32 iterates (TF32 products included), where that
    takes fewer FLOPs. In 16 bits the Gram iterates lose the small singular
    values, so it never does."""
    rows, cols = min(rows, cols), max(rows, cols)
    gram = _flops(rows, cols, _gram_matmuls(steps))
    return iterate_dtype(dtype) == "float32" and gram < _flops(rows, cols, _plain_matmuls(steps))


def newton_schulz_matmuls(rows, cols, steps, dtype=None):
    """The matrix products `newton_schulz` performs on one matrix of shape
    `(r, c) = (min(rows, cols), max(rows, cols))`.

    Returns:
        `(wide, square)`: the number of `r × c × r` products (`2·r²·c`
        FLOPs each) and of `r × r × r` products (`2·r³` FLOPs each).
    """
    if uses_gram_iteration(rows, cols, steps, dtype):
        return _gram_matmuls(steps)
    return _plain_matmuls(steps)


def newton_schulz_flops(rows, cols, steps, dtype=None):
    """FLOPs (2 per multiply-add) of the matrix products `newton_schulz`
    performs on one `(rows, cols)` matrix (or its transpose)."""
    matmuls = newton_schulz_matmuls(rows, cols, steps, dtype)
    return _flops(min(rows, cols), max(rows, cols), matmuls)


def _flops(rows, cols, matmuls):
    wide, square = matmuls
    return 2 * rows * rows * (wide * cols + square * rows)


def _plain_matmuls(steps):
    # Per step: X·Xᵀ and P·X, and G·G.
    return 2 * steps, steps


def _gram_matmuls(steps):
    # Per segment of `length` steps: X·Xᵀ and Q·X, and 4·length − 3 square
    # products (see `_gram_iteration`).
    segments = -(-steps // _GRAM_RESTART)
    return 2 * segments, 4 * steps - 3 * segments


def matmul(a, b, dtype=None):
    """`a @ b` in the precision `dtype` of the iteration (see `DTYPES`).

    - None, "float32": true float32 on every backend and device. JAX takes
      `precision="highest"` on the product. TensorFlow and torch have only
      a global setting, read here and never changed: where it lets this
      product run in TF32 (`_may_use_tf32`), it is computed from three TF32
      products (`tf32_x3`).
    - "tf32": JAX takes `precision="high"`: TF32 on NVIDIA GPUs from
      Ampere on, three bfloat16 passes on TPUs, float32 on CPUs.
      TensorFlow and torch multiply as their global setting says: TF32 on
      such GPUs with TensorFlow's default, float32 with torch's default
      (TF32 after `torch.set_float32_matmul_precision("high")`).
    - "bfloat16", "float16": the operands are in that dtype.
    """
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        return jnp.matmul(a, b, precision=_JAX_PRECISION[dtype])
    if dtype in (None, "float32") and _may_use_tf32(a):
        return tf32_x3(a, b)
    return _product(a, b)


# The precision of each JAX product, explicit so that the user's
# `jax_default_matmul_precision` does not change what `dtype` means.
_JAX_PRECISION = {
    None: "highest",
    "float32": "highest",
    "tf32": "high",
    "bfloat16": "default",
    "float16": "default",
}


def _product(a, b):
    """`a @ b`: like `*` and `+`, the backend's own operator, without the
    dispatch of a `keras.ops` call, which in eager torch costs more than a
    small product."""
    return a @ b


# TF32 keeps 10 of float32's 23 explicit mantissa bits.
_TF32_MASK = -(1 << 13)


def tf32_split(x):
    """`(hi, lo)` with `hi + lo == x` for float32 `x`: `hi` is `x` with its
    13 low mantissa bits cleared, so TF32 holds it exactly, and `lo` the
    rest, below 2⁻¹⁰·|x| (exact unless subnormal, where backends that flush
    subnormals to zero drop it)."""
    hi = ops.view(ops.bitwise_and(ops.view(x, "int32"), _TF32_MASK), "float32")
    return hi, x - hi


def tf32_x3(a, b):
    """`a @ b` to about float32 accuracy from three products that may run
    in TF32: `hi·hi' + (hi·lo' + lo·hi')` on the `tf32_split` of each side.
    TF32 holds `hi` exactly and rounds `lo` by under 2⁻²⁰ of the operand,
    and the dropped `lo·lo'` is under 2⁻²⁰ of `|a|·|b|`, where TF32 rounds
    the operands of one product by up to 2⁻¹⁰."""
    a_hi, a_lo = tf32_split(a)
    b_hi, b_lo = tf32_split(b)
    # The small terms are summed first, then rounded once against hi·hi'.
    return _product(a_hi, b_hi) + (_product(a_hi, b_lo) + _product(a_lo, b_hi))


def _may_use_tf32(x):
    """Whether the user's global setting lets a float32 product of `x` run
    in TF32. TensorFlow's (on by default) counts where a GPU that has TF32
    is visible, torch's (off by default) for tensors on a CUDA device. A
    CPU multiplies in float32 whatever the setting, so there the three
    products of `tf32_x3` would only cost time."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.tensor_float_32_execution_enabled() and _tf_gpu_has_tf32()
    if keras.backend.backend() == "torch" and x.device.type == "cuda":
        import torch

        matmul_setting = torch.backends.cuda.matmul
        if not hasattr(torch.backends, "fp32_precision"):  # torch < 2.9
            return matmul_setting.allow_tf32
        # This API, as torch's older getters raise once it has been used;
        # "none" defers to the setting of all backends.
        precision = matmul_setting.fp32_precision
        if precision == "none":
            precision = torch.backends.fp32_precision
        return precision == "tf32"
    return False


@functools.cache
def _tf_gpu_has_tf32():
    """Whether TensorFlow sees an NVIDIA GPU of compute capability 8.0
    (Ampere) or later, the first with TF32."""
    import tensorflow as tf

    return any(
        tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)) >= (8, 0)
        for gpu in tf.config.list_physical_devices("GPU")
    )


def _plain_iteration(x, schedule, eye, dtype):
    """`X ← (a·I + b·G + c·G²)·X` with `G = X·Xᵀ`, per step."""
    for a, b, c in schedule:
        gram = matmul(x, ops.swapaxes(x, -1, -2), dtype)
        poly = c * matmul(gram, gram, dtype) + b * gram + a * eye
        x = matmul(poly, x, dtype)
    return x


# Steps between two recomputations of X and its Gram matrix in
# `_gram_iteration`. Q grows the smallest singular values about a hundred
# times in three Polar Express steps, and float32 errors in Q grow with it:
# restarting every 3 steps keeps the result within about 1e-4 of the
# float64 iteration (the plain iteration: 1e-5), where never restarting
# leaves it about 1e-3 away.
_GRAM_RESTART = 3


def _gram_iteration(x, schedule, eye, dtype):
    """The plain iteration, carried out mostly on `rows × rows` matrices.

    Within a segment of steps, every iterate is `X_k = Q_k·X`, with `Q_k` a
    polynomial in `G = X·Xᵀ`. Each step forms `R = a·I + b·G_k + c·G_k²`,
    then `Q_{k+1} = R·Q_k` and `G_{k+1} = R·G_k·R`: `4·length − 3` products
    of `rows³` per segment, and two of `rows² × cols` (`G`, then `Q·X`) in
    place of two per step.

    References:
        - [Dao AI Lab, 2026](https://dao-lab.ai/blog/2026/gram-newton-schulz)
          (Gram Newton–Schulz)
    """
    for start in range(0, len(schedule), _GRAM_RESTART):
        segment = schedule[start : start + _GRAM_RESTART]
        gram = matmul(x, ops.swapaxes(x, -1, -2), dtype)
        q = None
        for step, (a, b, c) in enumerate(segment):
            r = c * matmul(gram, gram, dtype) + b * gram + a * eye
            q = r if q is None else matmul(r, q, dtype)
            if step < len(segment) - 1:
                gram = matmul(matmul(r, gram, dtype), r, dtype)
        x = matmul(q, x, dtype)
    return x


def _normalize(x):
    """`x / ‖x‖_F` per matrix, without overflow, underflow or an eps floor."""
    axes = (-2, -1)
    largest = ops.max(ops.abs(x), axis=axes, keepdims=True)
    inverse_largest = 1.0 / ops.where(largest > 0, largest, 1.0)
    norm = ops.sqrt(ops.sum(ops.square(x * inverse_largest), axis=axes, keepdims=True))
    # The two factors multiply first, so that x is rounded once.
    return x * (inverse_largest / ops.where(norm > 0, norm, 1.0))
