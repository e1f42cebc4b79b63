"""The factor `s` that multiplies msign(momentum) in the Muon update.

`d_in` is the side the layer reads (`x` in `y = x·W`), `d_out` the side it
writes: for a Keras `Dense` kernel stored `(d_in, d_out)` that is
`(shape[0], shape[1])`, the transpose of torch's `(out, in)` convention.
"""

import math

SCALES = ("moonlight", "jordan", "mup", "naive")


def update_scale(scale, d_in, d_out, rms_rate=0.2):
    """The factor applied to `msign(M)` of one `(d_in, d_out)` block.

    Args:
        scale: One of
            - `"moonlight"`: `rms_rate·sqrt(max(d_in, d_out))`, which gives
              the update the RMS of a typical AdamW update, so Adam's learning
              rate and weight decay carry over (Liu et al., 2025).
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
        if rms_rate is None:
            return 1.0
        return rms_rate * math.sqrt(max(d_in, d_out))
    if scale == "jordan":
        return math.sqrt(max(1.0, d_out / d_in))
    if scale == "mup":
        return math.sqrt(d_out / d_in)
    if scale == "naive":
        return 1.0
    raise ValueError(
        f"`scale` must be one of {SCALES}. Received: scale={scale!r}"
    )
