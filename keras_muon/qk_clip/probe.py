"""Recording each attention head's largest logit in the forward pass.

Each clipped layer gets a `LogitProbe`, a sublayer holding one zero
trainable variable per query head, and adds `sum(probe · S)` (zero) to the
model's losses, `S` the heads' largest logits of the step. The gradient of
the loss with respect to the probe is then `S`, and it travels to the
optimizer with the other gradients, whatever the training loop: this is
what makes it work in JAX's stateless steps, under `keras.distribution`
(the max is taken over the global batch) and under data parallelism, where
the forward pass takes the max over replicas first. The optimizer never
updates the probes, and they are not saved with the model's weights.
"""

import dataclasses
import functools
import inspect
import math
import typing

import keras
from keras import ops

from keras_muon.backends.distributed import max_over_replicas
from keras_muon.qk_clip import keras_hub
from keras_muon.qk_clip.rules import ATTENTION_RULES
from keras_muon.qk_clip.rules import AttentionSpec
from keras_muon.qk_clip.rules import ProjectionPart
from keras_muon.qk_clip.rules import projections
from keras_muon.routing.fused import part_factors
from keras_muon.routing.fused import side_of

_LOWEST = -3.0e38  # stands for "no allowed position" and keeps 0·S finite


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
    grouped = ops.reshape(query, (-1, queries, key_heads, query_heads // key_heads, head_dim))
    logits = ops.einsum("btkgd,bskd->bkgts", grouped, key) * scale
    if mask is not None:
        allowed = ops.cast(mask, "bool")[:, None, None, :, :]
        logits = ops.where(allowed, logits, _LOWEST)
    return ops.maximum(ops.reshape(ops.max(logits, axis=(0, 3, 4)), (-1,)), _LOWEST)


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


@dataclasses.dataclass(frozen=True)
class HeadColumns:
    """Where the heads of one query or key projection lie: its kernel and
    bias are scaled per head by the factors these functions of a factor
    per head `(heads,)` give (broadcast against the kernel and the bias)."""

    projection: keras.layers.Layer
    heads: int
    kernel_factors: typing.Callable
    bias_factors: typing.Callable | None


def head_columns(projection):
    """The `HeadColumns` of a projection an `AttentionSpec` names: an
    `EinsumDense` whose output's second-to-last axis is the heads, or a
    `ProjectionPart` of a fused projection. Raises a ValueError where the
    heads cannot be scaled alone."""
    if isinstance(projection, ProjectionPart):
        return _part_columns(projection)
    inputs, output = projection.equation.split("->")
    kernel_spec = inputs.split(",")[1]
    head = output[-2]
    if head not in kernel_spec:
        raise ValueError(f"{projection.path}: the kernel has no head axis")
    bias_factors = None
    if projection.bias is not None:
        if head not in (projection.bias_axes or ""):
            raise ValueError(f"{projection.path}: the bias is shared by the heads")
        # The bias broadcasts against (..., heads, head_dim).
        bias_factors = functools.partial(_along, rank=len(projection.bias.shape), axis=-2)
    axis, rank = kernel_spec.index(head), len(kernel_spec)
    heads = projection.kernel.shape[axis]
    return HeadColumns(
        projection, heads, functools.partial(_along, rank=rank, axis=axis), bias_factors
    )


def _along(factors, rank, axis):
    shape = [1] * rank
    shape[axis] = -1
    return ops.reshape(factors, shape)


def _part_columns(part):
    """A fused projection's part: the columns of each of its heads."""
    projection, layout = part.projection, part.layout
    first, last, length = side_of(projection)
    kernel_shape = tuple(projection.kernel.shape)
    side_shape = (1,) * first + kernel_shape[first:last] + (1,) * (len(kernel_shape) - last)

    def spread(factors, shape):
        return ops.reshape(part_factors(layout, length, part.part, factors), shape)

    bias = getattr(projection, "bias", None)
    if bias is not None and math.prod(bias.shape) != length:
        raise ValueError(f"{projection.path}: the bias is shared by the heads")
    bias_factors = None if bias is None else functools.partial(spread, shape=tuple(bias.shape))
    spread(ops.ones((part.heads,)), side_shape)  # checks the layout now
    return HeadColumns(
        projection, part.heads, functools.partial(spread, shape=side_shape), bias_factors
    )


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
    query_columns: tuple  # HeadColumns of each query projection
    key_columns: tuple
    max_logits: keras.Variable = None  # the optimizer's copy, set at build

    @property
    def path(self):
        return self.layer.path


def install_probe(layer, spec):
    """Makes `layer` record its logits in training forward passes; returns
    the `ClippedLayer`. Raises ValueError if the spec cannot be clipped."""
    query_columns = tuple(head_columns(p) for p in projections(spec.query))
    key_columns = tuple(head_columns(p) for p in projections(spec.key))
    for columns in (query_columns, key_columns):
        if len({c.heads for c in columns}) != 1:
            raise ValueError(f"{layer.path}: joint projections with different head counts")
    query_heads, key_heads = query_columns[0].heads, key_columns[0].heads
    if query_heads % key_heads:
        raise ValueError(
            f"{layer.path}: {query_heads} query heads are not a multiple of {key_heads} key heads"
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
    return ClippedLayer(layer, spec, probe, query_heads, key_heads, query_columns, key_columns)


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
    keras_hub.register_if_imported()
    clipped, skipped = [], []
    for layer in model._flatten_layers(include_self=True):
        rule = ATTENTION_RULES.rule(layer)
        if rule is None:
            continue
        spec = rule(layer)
        if isinstance(spec, str):
            skipped.append((layer.path, spec))
            continue
        try:
            clipped.append(install_probe(layer, spec))
        except ValueError as error:
            skipped.append((layer.path, str(error)))
    return clipped, skipped
