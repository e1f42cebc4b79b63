"""QK-Clip: keeps the attention logits of a model at or below a threshold.

Muon lets query and key projections grow until attention logits explode.
QK-Clip (the "MuonClip" of Kimi K2) records, during each training step, the
largest pre-softmax logit `S_h` of every attention head over the batch and
the positions its mask allows; after the optimizer's update, each head with
`S_h > τ` has its query and key projections rescaled so that the same
inputs would give a largest logit of exactly `τ`.

How the logits reach the optimizer: each clipped layer gets a
`LogitProbe`, a sublayer holding one zero trainable variable per query
head, and adds `sum(probe · S)` (zero) to the model's losses. The gradient
of the loss with respect to the probe is then `S`, and it travels to the
optimizer with the other gradients, whatever the training loop: this is
what makes it work in JAX's stateless steps, under `keras.distribution`
(the max is taken over the global batch) and under data parallelism, where
the forward pass takes the max over replicas first. The optimizer never
updates the probes, and they are not saved with the model's weights.

Which layers are clipped is decided by rules, one per layer type, like the
matrix rules of `register_layer_rule`: see `register_attention_rule`.
"""

import dataclasses
import functools
import inspect
import sys
import typing
import warnings

import keras
from keras import ops

from keras_muon.arguments import layer_rule
from keras_muon.distributed import max_over_replicas

_LOWEST = -3.0e38  # stands for "no allowed position" and keeps 0·S finite


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How QK-Clip reads and rescales one attention layer.

    Attributes:
        query: The query projection, an `EinsumDense` whose output is
            `(batch, positions, query_heads, head_dim)`.
        key: The key projection, output `(batch, positions, key_heads,
            head_dim)`; `query_heads` is a multiple of `key_heads`.
        scale: The factor of `q·k` in the logits (`1/sqrt(head_dim)`).
        method: The name of the layer's method that receives the projected
            query and key as its first two arguments (after rotary
            embeddings, if any) and the mask as `attention_mask`.
        mask: Optional `mask(layer, query, key, arguments) -> mask`: the
            positions allowed, `(batch, queries, keys)` boolean or None,
            from the query, key and the other arguments of `method` (a
            dict by name), for layers that restrict the mask further
            inside `method` (sliding windows). By default the
            `attention_mask` argument, and-ed with a causal mask when a
            `use_causal_mask` argument is true.
    """

    query: keras.layers.EinsumDense
    key: keras.layers.EinsumDense
    scale: float
    method: str = "_compute_attention"
    mask: typing.Callable | None = None


_RULES = {}


def register_attention_rule(layer_type, rule):
    """Declares how QK-Clip reads and rescales the attention of `layer_type`
    (and subclasses).

    Args:
        layer_type: A `keras.layers.Layer` subclass.
        rule: `rule(layer) -> AttentionSpec`, or a string saying why the
            layer cannot be clipped (it is then listed, not clipped).

    Example:

    ```python
    def my_attention_rule(layer):
        if layer.normalize_qk:
            return "QK-norm: scaling the kernels does not change the logits"
        return keras_muon.AttentionSpec(
            query=layer.q_proj, key=layer.k_proj, scale=layer.head_dim**-0.5,
            method="attend",  # attend(q, k, v, attention_mask=None)
        )

    keras_muon.register_attention_rule(MyAttention, my_attention_rule)
    ```
    """
    layer_rule(layer_type, rule)
    _RULES[layer_type] = rule


def register_default_attention_rule(layer_type, rule):
    """Like `register_attention_rule`, but keeps a rule already registered
    for `layer_type`: for the rules keras_muon declares for other
    libraries."""
    _RULES.setdefault(layer_type, rule)


def attention_rule(layer):
    """The rule of the most specific registered class of `layer`, or None."""
    for cls in type(layer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def head_max_logits(query, key, scale, mask=None):
    """The largest logit `q·k·scale` of each query head, over the batch and
    the allowed positions.

    Args:
        query: `(batch, queries, query_heads, head_dim)`.
        key: `(batch, keys, key_heads, head_dim)`, `query_heads` a multiple
            of `key_heads` (query head `h` attends with key head
            `h // (query_heads / key_heads)`).
        scale: Python float.
        mask: None, or broadcastable to `(batch, queries, keys)`, true
            where a query may attend to a key.

    Returns:
        `(query_heads,)` float32. A head with no allowed position gets a
        very negative finite value.
    """
    query = ops.cast(ops.stop_gradient(query), "float32")
    key = ops.cast(ops.stop_gradient(key), "float32")
    _, queries, query_heads, head_dim = query.shape
    key_heads = key.shape[2]
    grouped = ops.reshape(
        query, (-1, queries, key_heads, query_heads // key_heads, head_dim)
    )
    logits = ops.einsum("btkgd,bskd->bkgts", grouped, key) * scale
    if mask is not None:
        allowed = ops.cast(mask, "bool")[:, None, None, :, :]
        logits = ops.where(allowed, logits, _LOWEST)
    return ops.maximum(ops.reshape(ops.max(logits, axis=(0, 3, 4)), (-1,)), _LOWEST)


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
    gamma = ops.where(
        max_logits > threshold, threshold / ops.maximum(max_logits, threshold), 1.0
    )
    group_gamma = ops.min(ops.reshape(gamma, (-1, group_size)), axis=1)
    key_factors = ops.power(group_gamma, 1.0 - alpha)
    query_factors = gamma / ops.repeat(key_factors, group_size)
    return query_factors, key_factors


class LogitProbe(keras.layers.Layer):
    """One zero variable per query head whose gradient is the head's
    largest logit of the step. Holds no weight of the model: saving and
    loading skip it."""

    def __init__(self, heads, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.heads = heads
        self.probe = self.add_weight(
            shape=(heads,), initializer="zeros", name="probe", autocast=False
        )
        self.built = True

    def record(self, max_logits):
        """Adds `sum(probe · max_logits)`, zero, to the model's losses."""
        self.add_loss(ops.sum(ops.multiply(self.probe, max_over_replicas(max_logits))))

    def save_own_variables(self, store):
        pass

    def load_own_variables(self, store):
        pass


def _head_axes(projection):
    """The head axis of an `EinsumDense` projection's kernel and bias: the
    output's second-to-last axis."""
    inputs, output = projection.equation.split("->")
    kernel_spec = inputs.split(",")[1]
    head = output[-2]
    if head not in kernel_spec:
        raise ValueError(f"{projection.path}: the kernel has no head axis")
    bias_axis = None
    if projection.bias is not None:
        if head not in (projection.bias_axes or ""):
            raise ValueError(f"{projection.path}: the bias is shared by the heads")
        bias_axis = -2  # the bias broadcasts against (..., heads, head_dim)
    return kernel_spec.index(head), bias_axis


def _scaled(variable, factors, axis):
    shape = [1] * len(variable.shape)
    shape[axis] = -1
    value = ops.multiply(ops.cast(variable, "float32"), ops.reshape(factors, shape))
    return ops.cast(value, variable.dtype)


def default_mask(layer, query, key, arguments):
    """The `attention_mask` argument, and-ed with a causal mask (query `i`
    sees keys `j <= i`) when the `use_causal_mask` argument is true."""
    mask = arguments.get("attention_mask")
    if arguments.get("use_causal_mask"):
        causal = ops.greater_equal(
            ops.arange(query.shape[1])[:, None], ops.arange(key.shape[1])[None, :]
        )[None]
        mask = causal if mask is None else ops.logical_and(ops.cast(mask, "bool"), causal)
    return mask


@dataclasses.dataclass
class ClippedLayer:
    """An attention layer clipped by the optimizer."""

    layer: keras.Layer
    spec: AttentionSpec
    probe: LogitProbe
    query_heads: int
    key_heads: int
    query_axes: tuple
    key_axes: tuple
    max_logits: keras.Variable = None  # the optimizer's copy, set at build

    @property
    def path(self):
        return self.layer.path


def attach(layer, spec):
    """Makes `layer` record its logits in training forward passes; returns
    the `ClippedLayer`. Raises ValueError if the spec cannot be clipped."""
    query_axes = _head_axes(spec.query)
    key_axes = _head_axes(spec.key)
    query_heads = spec.query.kernel.shape[query_axes[0]]
    key_heads = spec.key.kernel.shape[key_axes[0]]
    if query_heads % key_heads:
        raise ValueError(
            f"{layer.path}: {query_heads} query heads are not a multiple of "
            f"{key_heads} key heads"
        )
    probe = getattr(layer, "_qk_clip_probe", None)
    if probe is None:
        probe = LogitProbe(query_heads, name=f"{layer.name}_qk_clip_probe")
        _hook(layer, spec, probe)
        # A built layer refuses new state; this is the optimizer's, not the
        # model's.
        layer._tracker.unlock()
        layer._qk_clip_probe = probe
        layer._tracker.lock()
    return ClippedLayer(layer, spec, probe, query_heads, key_heads, query_axes, key_axes)


def _hook(layer, spec, probe):
    """Wraps `layer.call` (to know whether this is a training call) and
    `spec.method` (to record the logits from its query and key)."""
    call = layer.call
    method = getattr(layer, spec.method)
    signature = inspect.signature(method)
    query_name, key_name = list(signature.parameters)[:2]
    mask_of = spec.mask or default_mask
    training = []

    @functools.wraps(call)
    def call_noting_training(*args, **kwargs):
        training.append(kwargs.get("training"))
        try:
            return call(*args, **kwargs)
        finally:
            training.pop()

    @functools.wraps(method)
    def method_recording_logits(*args, **kwargs):
        # Evaluation and prediction (training=False) record nothing.
        if not training or training[-1] is not False:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            query, key = bound.arguments[query_name], bound.arguments[key_name]
            mask = mask_of(layer, query, key, bound.arguments)
            probe.record(head_max_logits(query, key, spec.scale, mask))
        return method(*args, **kwargs)

    layer.call = call_noting_training
    setattr(layer, spec.method, method_recording_logits)


def find_attention(model):
    """`(ClippedLayer list, [(path, reason)] of attention layers not
    clipped)` for the layers of `model` that have an attention rule."""
    if "keras_hub" in sys.modules:
        from keras_muon import keras_hub_rules

        keras_hub_rules.register_attention()
    clipped, skipped = [], []
    for layer in model._flatten_layers(include_self=True):
        rule = attention_rule(layer)
        if rule is None:
            continue
        spec = rule(layer)
        if isinstance(spec, str):
            skipped.append((layer.path, spec))
            continue
        try:
            clipped.append(attach(layer, spec))
        except ValueError as error:
            skipped.append((layer.path, str(error)))
    return clipped, skipped


class QKClip:
    """The optimizer's side of QK-Clip: reads the probes' gradients and
    rescales the query and key projections after each update."""

    def __init__(self, model, threshold, alpha):
        if model is None:
            raise ValueError(
                "`qk_clip_threshold` needs the model: call "
                "`optimizer.attach(model)` before building the optimizer in "
                "a custom training loop (`fit` finds it)."
            )
        self.threshold = threshold
        self.alpha = alpha
        self.layers, self.skipped = find_attention(model)
        for path, reason in self.skipped:
            warnings.warn(f"QK-Clip does not clip {path}: {reason}", stacklevel=3)
        self.probes = [clipped.probe.probe for clipped in self.layers]
        if self.probes and hasattr(model, "_track_variables"):
            # torch: the model's parameters were listed when it was built;
            # list them again, probes included (DistributedDataParallel
            # synchronizes those).
            model._track_variables()
        self.clipped_heads = None

    def build(self, optimizer):
        """Creates the optimizer's state: each layer's largest logits of the
        last step and the number of heads clipped."""
        for clipped in self.layers:
            clipped.max_logits = optimizer.add_variable(
                shape=(clipped.query_heads,),
                dtype="float32",
                aggregation="sum",  # the probes' gradients, summed as gradients are
                name=f"{clipped.path.replace('/', '_')}_max_logits",
            )
        self.clipped_heads = optimizer.add_variable(
            shape=(), dtype="float32", aggregation="only_first_replica", name="clipped_heads"
        )

    def take_logits(self, grads, variables, optimizer, required=True):
        """Stores the probes' gradients as the layers' largest logits and
        returns the other gradients and variables. Raises if a probe's
        gradient is missing, unless not `required` (then stores none)."""
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
            for projection, axes, factors in (
                (clipped.spec.query, clipped.query_axes, query_factors),
                (clipped.spec.key, clipped.key_axes, key_factors),
            ):
                kernel_axis, bias_axis = axes
                optimizer.assign(
                    projection.kernel, _scaled(projection.kernel, factors, kernel_axis)
                )
                if bias_axis is not None:
                    optimizer.assign(
                        projection.bias, _scaled(projection.bias, factors, bias_axis)
                    )
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
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        title = f"QK-Clip: threshold {self.threshold:g}, alpha {self.alpha:g}"
        if len(rows) == 1:
            lines.append("(no attention layer with a rule)")
        return "\n".join([title, *lines])


def einsum_projection_rule(query, key, scale, mask=None):
    """A rule for layers whose `_compute_attention(query, key, value,
    attention_mask, ...)` receives the projections `layer.<query>` and
    `layer.<key>`, with logits scaled by `scale(layer)`."""

    def rule(layer):
        if len(getattr(layer, "_attention_axes", None) or (1,)) != 1:
            return "attention over several axes is not supported"
        return AttentionSpec(
            query=getattr(layer, query), key=getattr(layer, key), scale=scale(layer), mask=mask
        )

    return rule


register_attention_rule(
    keras.layers.MultiHeadAttention,
    einsum_projection_rule("_query_dense", "_key_dense", lambda l: l._inverse_sqrt_key_dim),
)
register_attention_rule(
    keras.layers.GroupQueryAttention,
    einsum_projection_rule("_query_dense", "_key_dense", lambda l: l._inverse_sqrt_head_dim),
)
