"""QK-Clip on the optimizer's side: keeps attention logits at or below τ.

Muon lets query and key projections grow until attention logits explode.
QK-Clip (the "MuonClip" of Kimi K2) records, during each training step,
the largest pre-softmax logit `S_h` of every attention head over the batch
and the positions its mask allows (`qk_clip.probe`); after the optimizer's
update, each head with `S_h > τ` has its query and key projections
rescaled so that the same inputs would give a largest logit of exactly
`τ`. Which layers are clipped is decided by rules (`qk_clip.rules`).

`QKClip` is what a `Muon` created with `qk_clip_threshold` holds: at build
it installs the probes, whose gradients carry the logits; in `apply` it
takes those gradients out of the update; after the update it clips.
"""

import warnings

import keras
from keras import ops

from keras_muon.backends import distributed
from keras_muon.naming import state_name
from keras_muon.qk_clip.probe import find_attention
from keras_muon.report import format_table


class QKClip:
    """QK-Clip for one optimizer, with threshold `τ` and query share `α`."""

    def __init__(self, threshold, alpha):
        self.threshold = threshold
        self.alpha = alpha
        self.layers, self.skipped, self.probes = [], [], []
        self.clipped_heads = None

    @classmethod
    def for_optimizer(cls, optimizer):
        """The QK-Clip of an optimizer created with `qk_clip_threshold`
        (its `qk_clip_alpha`), or None if it has no threshold."""
        if optimizer.qk_clip_threshold is None:
            return None
        if optimizer.gradient_accumulation_steps:
            raise ValueError(
                "`qk_clip_threshold` does not support `gradient_accumulation_steps`: "
                "the clip needs the largest logit over all accumulated batches."
            )
        return cls(optimizer.qk_clip_threshold, optimizer.qk_clip_alpha)

    @staticmethod
    def of(optimizer):
        """The QK-Clip of `optimizer`, once built, to read its statistics."""
        if optimizer._qk_clip is None or not optimizer.built:
            raise ValueError(
                "QK-Clip statistics exist once an optimizer created with "
                "`qk_clip_threshold` is built."
            )
        return optimizer._qk_clip

    def install(self, model, var_list):
        """Gives each attention layer of `model` a logit probe (when the
        optimizer is built). Returns `var_list` with the probes, in the
        model's order if `var_list` is all of the model's trainable
        variables: JAX's trainer pairs them with the optimizer's by
        position."""
        strategy = distributed.tf_strategy()
        if strategy is not None and not distributed.is_mirrored(strategy):
            raise ValueError(
                f"`qk_clip_threshold` supports tf.distribute.MirroredStrategy, not "
                f"{type(strategy).__name__}."
            )
        if model is None:
            raise ValueError(
                "`qk_clip_threshold` needs the model: call "
                "`optimizer.attach(model)` before building the optimizer in "
                "a custom training loop (`fit` finds it)."
            )
        self.layers, self.skipped = find_attention(model)
        for path, reason in self.skipped:
            warnings.warn(f"QK-Clip does not clip {path}: {reason}", stacklevel=2)
        self.probes = [clipped.probe.probe for clipped in self.layers]
        if self.probes and hasattr(model, "_track_variables"):
            # torch: the model's parameters were listed when it was built;
            # list them again, probes included (DistributedDataParallel
            # synchronizes those).
            model._track_variables()
        var_list = [*var_list, *(p for p in self.probes if not _contains(var_list, p))]
        ordered = model.trainable_variables
        if len(ordered) == len(var_list) and all(_contains(var_list, v) for v in ordered):
            return ordered
        return var_list

    def is_probe(self, variable):
        """Whether `variable` is one of the logit probes."""
        return _contains(self.probes, variable)

    def build(self, optimizer):
        """Creates the optimizer's state: each layer's largest logits of the
        last step and the number of heads clipped."""
        for clipped in self.layers:
            clipped.max_logits = optimizer.add_variable(
                shape=(clipped.query_heads,),
                dtype="float32",
                aggregation="sum",  # the probes' gradients, summed as gradients are
                name=state_name(clipped.path, "max_logits"),
            )
        self.clipped_heads = optimizer.add_variable(
            shape=(), dtype="float32", aggregation="only_first_replica", name="clipped_heads"
        )

    def take_logits(self, optimizer, grads, variables):
        """Stores the probes' gradients as the layers' largest logits (at
        the start of `optimizer.apply`, which it builds if needed) and
        returns the other gradients and variables. Raises if a probe's
        gradient is missing, unless this is a TensorFlow trace that built
        the optimizer: it ran the model before the probes existed and only
        initializes the variables (then stores none)."""
        built_now = not optimizer.built
        if built_now:
            optimizer.build(variables)
        required = not (built_now and _in_tf_function())
        positions = {id(probe): i for i, probe in enumerate(self.probes)}
        kept_grads, kept_variables = [], []
        found = [None] * len(self.probes)
        for gradient, variable in zip(grads, variables):
            i = positions.get(id(variable))
            if i is None:
                kept_grads.append(gradient)
                kept_variables.append(variable)
            else:
                found[i] = gradient
        if not required and any(gradient is None for gradient in found):
            return kept_grads, kept_variables
        for clipped, gradient in zip(self.layers, found):
            if gradient is None:
                raise ValueError(
                    f"QK-Clip received no gradient for the logit probe of "
                    f"{clipped.path}, so it cannot see that layer's logits. "
                    "Build the optimizer before taking gradients "
                    "(`optimizer.build(model.trainable_variables)`), take "
                    "gradients of all of `model.trainable_variables`, add "
                    "`sum(model.losses)` to the loss, and call the model "
                    "with `training=True`."
                )
            if optimizer.loss_scale_factor is not None:
                gradient = gradient / optimizer.loss_scale_factor
            optimizer.assign(clipped.max_logits, ops.cast(gradient, "float32"))
        return kept_grads, kept_variables

    def clip(self, optimizer):
        """Rescales the query and key projections of the heads whose
        largest logit exceeded the threshold."""
        counts = []
        for clipped in self.layers:
            max_logits = ops.convert_to_tensor(clipped.max_logits)
            query_factors, key_factors = clip_factors(
                max_logits,
                self.threshold,
                self.alpha,
                clipped.query_heads // clipped.key_heads,
            )
            for columns, factors in (
                *((c, query_factors) for c in clipped.query_columns),
                *((c, key_factors) for c in clipped.key_columns),
            ):
                kernel, bias = columns.projection.kernel, columns.projection.bias
                optimizer.assign(kernel, _scaled(kernel, columns.kernel_factors(factors)))
                if columns.bias_factors is not None:
                    optimizer.assign(bias, _scaled(bias, columns.bias_factors(factors)))
            counts.append(ops.sum(ops.cast(max_logits > self.threshold, "float32")))
        optimizer.assign(self.clipped_heads, ops.sum(ops.stack(counts)) if counts else 0.0)

    def max_logits(self):
        return {c.path: ops.convert_to_numpy(c.max_logits) for c in self.layers}

    def clipped_count(self):
        return int(ops.convert_to_numpy(self.clipped_heads))

    def summary(self):
        """The attention layers, clipped or why not, as text."""
        rows = [("Attention layer", "Heads (query/key)", "QK-Clip")]
        rows += [(c.path, f"{c.query_heads}/{c.key_heads}", "clipped") for c in self.layers]
        rows += [(path, "", f"not clipped: {reason}") for path, reason in self.skipped]
        lines = format_table(rows)
        title = f"QK-Clip: threshold {self.threshold:g}, alpha {self.alpha:g}"
        if len(rows) == 1:
            lines.append("(no attention layer with a rule)")
        return "\n".join([title, *lines])


def clip_factors(max_logits, threshold, alpha, group_size):
    """The factors of each query head's and key head's projection.

    A head `h` with `S_h > τ` gets `γ_h = τ/S_h`, others `γ_h = 1`. A key
    head shared by a group of query heads (grouped-query attention) is
    multiplied by `γ_g^(1−α)`, `γ_g` the smallest `γ` of its group, and
    each of its query heads by `γ_h·γ_g^(α−1)`: every head's logits are
    multiplied by exactly its own `γ_h`. With one query head per key head
    this is `γ^α` for the query and `γ^(1−α)` for the key.

    Args:
        max_logits: `(query_heads,)` float32, the `S_h`.
        threshold: `τ > 0`.
        alpha: The share of the clip on the query side, in [0, 1].
        group_size: Query heads per key head.

    Returns:
        `(query_factors (query_heads,), key_factors (key_heads,))`.
    """
    gamma = ops.where(max_logits > threshold, threshold / ops.maximum(max_logits, threshold), 1.0)
    group_gamma = ops.min(ops.reshape(gamma, (-1, group_size)), axis=1)
    key_factors = ops.power(group_gamma, 1.0 - alpha)
    query_factors = gamma / ops.repeat(key_factors, group_size)
    return query_factors, key_factors


def _scaled(variable, factors):
    value = ops.multiply(ops.cast(variable, "float32"), factors)
    return ops.cast(value, variable.dtype)


def _contains(variables, variable):
    return any(v is variable for v in variables)


def _in_tf_function():
    """Whether this runs while TensorFlow traces a function. A function
    that creates variables in its first trace (an optimizer built by its
    first `apply`) is traced again before it runs."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.inside_function()
