"""The optimizers' arguments: checks whose errors name the argument, and
the documentation that the three classes share."""

import functools
import math
import numbers

import keras


class Default(float):
    """A default value of an argument, which remembers that the caller did
    not give it (the weight decay that Hyperball replaces)."""


def number(arg, value, minimum=None, below=None, above=None, maximum=None, optional=False):
    """`value` as a Python float, or a ValueError naming `arg` and the bounds."""
    if value is None and optional:
        return None
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if above is not None:
        bounds.append(f"> {above}")
    if below is not None:
        bounds.append(f"< {below}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    if not (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (minimum is None or value >= minimum)
        and (above is None or value > above)
        and (below is None or value < below)
        and (maximum is None or value <= maximum)
    ):
        allowed = "a finite number " + " and ".join(bounds)
        if optional:
            allowed += ", or None"
        raise ValueError(f"`{arg}` must be {allowed}. Received: {arg}={value!r}")
    return float(value)


def optional_number(arg, value, **bounds):
    """`number(arg, value, **bounds)`, or None for None."""
    return number(arg, value, optional=True, **bounds)


def positive_integer(arg, value):
    """`value`, or a ValueError naming `arg` unless it is an integer >= 1."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{arg}` must be an integer >= 1. Received: {arg}={value!r}")
    return int(value)


def optional_integer(arg, value):
    """`positive_integer(arg, value)`, or None for None."""
    return None if value is None else positive_integer(arg, value)


def boolean(arg, value):
    if not isinstance(value, bool):
        raise ValueError(f"`{arg}` must be True or False. Received: {arg}={value!r}")
    return value


def layer_rule(layer_type, rule):
    """Checks the arguments of a rule registration: `layer_type` a
    `keras.Layer` subclass, `rule` callable."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, keras.Layer)):
        raise ValueError(f"`layer_type` must be a keras.Layer subclass. Received: {layer_type!r}")
    if not callable(rule):
        raise ValueError(f"`rule` must be callable. Received: {rule!r}")


# The arguments of `Muon`, written once for the docstrings of the three
# classes (`document`).
ARGUMENTS = {
    "learning_rate": """A float, a
    `keras.optimizers.schedules.LearningRateSchedule` instance, or a
    callable that takes no arguments and returns the value to use. With
    `scale="moonlight"`, Muon's update has the RMS of an AdamW update, so
    AdamW's learning rate is a safe start; Muon stays stable at larger
    ones. Defaults to `0.003`.""",
    "momentum": "Float in [0, 1), the momentum of Muon. Defaults to `0.95`.",
    "nesterov": "Boolean, whether Muon uses Nesterov momentum. Defaults to `True`.",
    "weight_decay": """Float >= 0, decoupled weight decay of Muon variables,
    multiplied by the learning rate. Defaults to `0.1`, none with
    `hyperball=True`.""",
    "scale": """How the orthogonalized update is scaled per `(d_in, d_out)`
    block: `"moonlight"` (`rms_rate·sqrt(max(d_in, d_out))`, AdamW-like
    update size), `"jordan"` (`sqrt(max(1, d_out/d_in))`), `"mup"`
    (`sqrt(d_out/d_in)`) or `"naive"` (1). The last three need a learning
    rate about `0.2·sqrt(d)` times AdamW's. Defaults to `"moonlight"`.""",
    "rms_rate": """Float > 0, the update RMS targeted by the `"moonlight"`
    scale (the only one that uses it). `None` means a factor of 1, as in
    `keras.optimizers.Muon`. Defaults to `0.2`.""",
    "ns_steps": "Integer >= 1, number of Newton–Schulz steps. Defaults to `5`.",
    "ns_coefficients": """The `(a, b, c)` of each Newton–Schulz step:
    `"polar_express"`, `"jordan"`, `"you"`, or a sequence of triples (the
    last one repeats up to `ns_steps`). Defaults to `"polar_express"`.""",
    "ns_dtype": """Precision of the Newton–Schulz iteration, the same on
    every backend: `None` or `"float32"` (true float32 products, also on
    GPUs and TPUs), `"tf32"` (TF32 products on NVIDIA GPUs from Ampere on),
    `"bfloat16"` (fastest on accelerators) or `"float16"`. Normalization is
    always float32; see docs/speed.md.""",
    "per_head": """Boolean. If `True`, attention projections (`EinsumDense`
    kernels with a `(heads, head_dim)` side) are orthogonalized head by
    head. Defaults to `False`.""",
    "exclude_layers": """A regular expression or list of them; variables whose
    path matches one are optimized by AdamW.""",
    "adam_beta_1": "Float in [0, 1), AdamW's first-moment decay. Defaults to `0.9`.",
    "adam_beta_2": "Float in [0, 1), AdamW's second-moment decay. Defaults to `0.999`.",
    "epsilon": "Float > 0, AdamW's epsilon. Defaults to `1e-7`.",
    "adam_weight_decay": """Float >= 0, decoupled weight decay of AdamW
    variables. Defaults to `0.004`.""",
    "adam_lr_ratio": """Float >= 0, AdamW's learning rate as a multiple of
    `learning_rate`. Defaults to `1.0`.""",
    "cautious_weight_decay": """Boolean. If `True`, weight decay applies only
    to the entries whose update has the sign of the weight (Chen et al.,
    2025), on Muon's and AdamW's side alike. Defaults to `False`.""",
    "qk_clip_threshold": """None, or a float `τ > 0`: QK-Clip (Kimi K2's
    MuonClip). After each update, an attention head whose largest
    pre-softmax logit of the step `S_h` exceeded `τ` has its query and key
    projections multiplied by `γ^α` and `γ^(1−α)`, `γ = τ/S_h`. See
    docs/muonclip.md for the layers it clips. Defaults to `None` (off).""",
    "qk_clip_alpha": """Float in [0, 1], the share of the clip taken by the
    query projection. Defaults to `0.5`.""",
    "split_newton_schulz": """Boolean. Under data parallelism
    (`keras.distribution`, `tf.distribute.MirroredStrategy`, torch's
    default process group), each device orthogonalizes `1/N` of the
    blocks and the devices all-gather the results; on torch every process
    must train a copy of the same model. `False`: every device
    orthogonalizes every block. Defaults to `True`.""",
    "ns_bucket_bytes": """Integer >= 1 or `None`: the most bytes of
    float32 blocks each device holds for Newton–Schulz at once (a variable
    split over N devices counts 1/N of its blocks). The Muon variables are
    updated in buckets of blocks of one shape, one bucket after the other,
    so the update's scratch memory stays that of one bucket however large
    the model (docs/distributed.md); a variable is never cut. It must hold
    the largest block. Defaults to `None`: 128 MiB, or the largest block
    where that is larger, which leaves a small model in one bucket.""",
    "momentum_dtype": """`"float32"`, `"bfloat16"` or `"int8"`: how Muon's
    momentum is stored between steps. `"int8"` keeps blocks of up to 2048
    elements along its last axis as int8 codes with one float32 scale each,
    about a quarter of float32's bytes. The update computes in float32 and
    Newton–Schulz sees the step's momentum before it is rounded. AdamW's
    moments and NorMuon's and AdaMuon's second moments stay float32.
    Defaults to `"float32"` (docs/distributed.md).""",
    "lora": """`"muon"` or `"adamw"`: where the LoRA factors of `Dense` and
    `EinsumDense` kernels (`enable_lora`) go. On Muon each factor is a
    matrix of its own, `(d_in, r)` and `(r, d_out)`, scaled as any block
    (`scale`). Defaults to `"muon"` (docs/lora.md).""",
    "hyperball": """Boolean. If `True`, each Muon block `W_b` stays on the
    sphere of its Frobenius norm when the optimizer is built, `R_b`:
    `W_b ← R_b·normalize(W_b − lr·R_b·normalize(U_b))`, `U_b` the block's
    update (Wen et al., 2026), in place of weight decay. The learning rate
    is then the relative size of a step on the sphere. LoRA factors keep
    the plain update. Defaults to `False` (docs/variants.md).""",
    "name": "String, the name of the optimizer and prefix of its variables.",
    "**kwargs": """Arguments of every Keras optimizer: `clipnorm`,
    `clipvalue`, `global_clipnorm`, `use_ema`, `ema_momentum`,
    `ema_overwrite_frequency`, `loss_scale_factor`,
    `gradient_accumulation_steps`; see `keras.optimizers.Optimizer`.""",
}


def document(cls=None, *, omit=()):
    """Writes `ARGUMENTS` but `omit` into the docstring of `cls`, in place
    of `{{muon_arguments}}`; a class decorator."""
    if cls is None:
        return functools.partial(document, omit=omit)
    lines = []
    for name, text in ARGUMENTS.items():
        if name not in omit:
            lines.append(f"{name}: {text}")
    cls.__doc__ = cls.__doc__.replace(
        "{{muon_arguments}}", "\n".join(lines).replace("\n", "\n        ")
    )
    return cls
