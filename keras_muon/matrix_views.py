"""Which variables are matrices, and how each is read as (d_in, d_out) blocks.

A Keras layer stores its weight matrix in a layout of its own: a `Conv2D`
kernel is `(kh, kw, c_in/groups, c_out)`, an LSTM kernel concatenates four
gates, a `MultiHeadAttention` projection is 3-D. A `MatrixView` says how to
reshape and transpose such a variable into `num_blocks` matrices of shape
`(d_in, d_out)`, in the layer's own sense: `d_in` is the side it reads.

Per layer type, a rule `rule(layer, variable, per_head) -> Route` decides
whether a variable goes to Muon (with its view) or to AdamW (with a reason).
Rules for Keras's layers are registered here; `register_layer_rule` lets a
library declare its own.
"""

import dataclasses
import math
import re

import keras
from keras import ops
from keras.src.layers.rnn.conv_lstm import ConvLSTMCell  # not exported

from keras_muon.arguments import layer_rule


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A variable read as a stack of `(d_in, d_out)` matrices.

    The variable is reshaped to `split_shape`, transposed by `perm` (block,
    input and output axes, in that order) and reshaped to
    `(num_blocks, d_in, d_out)`. Build one with `MatrixView.from_axes`.
    """

    shape: tuple
    split_shape: tuple
    perm: tuple
    num_blocks: int
    d_in: int
    d_out: int

    @classmethod
    def from_axes(cls, shape, inputs, outputs, blocks=(), split_shape=None):
        """Views `shape` with the given input, output and block axes.

        Args:
            shape: Shape of the variable.
            inputs: Axes whose product is `d_in` (the side the layer reads).
            outputs: Axes whose product is `d_out`.
            blocks: Axes that index independent matrices (attention heads,
                RNN gates, conv groups).
            split_shape: Optional shape to reshape the variable to first, so
                that one stored axis can hold several logical ones (e.g. an
                LSTM kernel `(i, 4·u)` read as `(i, 4, u)`). The axes above
                refer to it.

        Returns:
            A `MatrixView`.
        """
        shape = tuple(int(d) for d in shape)
        split_shape = tuple(int(d) for d in (split_shape or shape))
        if math.prod(split_shape) != math.prod(shape):
            raise ValueError(
                f"split_shape {split_shape} does not have the size of the "
                f"variable shape {shape}"
            )
        inputs, outputs, blocks = tuple(inputs), tuple(outputs), tuple(blocks)
        perm = blocks + inputs + outputs
        if sorted(perm) != list(range(len(split_shape))):
            raise ValueError(
                f"blocks {blocks}, inputs {inputs} and outputs {outputs} must "
                f"name every axis of shape {split_shape} exactly once"
            )
        if not inputs or not outputs:
            raise ValueError("A matrix view needs input and output axes")

        def size(axes):
            return math.prod(split_shape[a] for a in axes)

        # Axes of size 1 do not move data: skip transposes that only move them.
        moved = [a for a in perm if split_shape[a] != 1]
        if moved == sorted(moved):
            perm = tuple(range(len(split_shape)))
        return cls(
            shape=shape,
            split_shape=split_shape,
            perm=perm,
            num_blocks=size(blocks),
            d_in=size(inputs),
            d_out=size(outputs),
        )

    @property
    def matrix_shape(self):
        return (self.d_in, self.d_out)

    @property
    def _transposes(self):
        return self.perm != tuple(range(len(self.perm)))

    def to_blocks(self, x):
        """`x` of the variable's shape as `(num_blocks, d_in, d_out)`."""
        if self._transposes:
            x = ops.transpose(ops.reshape(x, self.split_shape), self.perm)
        return ops.reshape(x, (self.num_blocks, self.d_in, self.d_out))

    def to_wide_blocks(self, x):
        """`to_blocks(x)` in float32, each block with no more rows than
        columns (tall blocks transposed), so that blocks of transposed
        shapes share one Newton–Schulz batch."""
        blocks = ops.cast(self.to_blocks(x), "float32")
        return ops.swapaxes(blocks, -1, -2) if self.d_in > self.d_out else blocks

    def from_blocks(self, blocks):
        """The inverse of `to_blocks`."""
        if self._transposes:
            permuted = tuple(self.split_shape[a] for a in self.perm)
            blocks = ops.reshape(blocks, permuted)
            inverse = tuple(self.perm.index(a) for a in range(len(self.perm)))
            blocks = ops.transpose(blocks, inverse)
        return ops.reshape(blocks, self.shape)


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a variable is optimized: Muon with `view`, or AdamW if None."""

    view: MatrixView | None
    reason: str

    @property
    def name(self):
        return "adamw" if self.view is None else "muon"


_RULES = {}


def register_layer_rule(layer_type, rule):
    """Declares how the variables of `layer_type` (and subclasses) are routed.

    Args:
        layer_type: A `keras.layers.Layer` subclass.
        rule: `rule(layer, variable, per_head) -> Route`, called once per
            variable that `layer` creates, when the optimizer is built.
            Return `Route(MatrixView.from_axes(...), reason)` to send it to
            Muon, `Route(None, reason)` for AdamW.

    Example:

    ```python
    def my_projection_rule(layer, variable, per_head):
        if variable.name == "w":  # stored (d_out, d_in)
            view = keras_muon.MatrixView.from_axes(
                variable.shape, inputs=(1,), outputs=(0,)
            )
            return keras_muon.Route(view, "MyProjection weight")
        return keras_muon.Route(None, "MyProjection bias")

    keras_muon.register_layer_rule(MyProjection, my_projection_rule)
    ```
    """
    layer_rule(layer_type, rule)
    _RULES[layer_type] = rule


def register_default_rule(layer_type, rule):
    """Like `register_layer_rule`, but keeps a rule already registered for
    `layer_type`: for the rules keras_muon declares for other libraries."""
    _RULES.setdefault(layer_type, rule)


def route_by_layer(layer, variable, per_head):
    """The route of `variable`, created by `layer`, from the layer's type.

    The most specific class of `layer` with a registered rule decides. A
    class named `...Embedding` without one is an embedding: embedding layers
    of other libraries (keras-hub's `PositionEmbedding`, ...) need not
    subclass Keras's, but are named for what they are.
    """
    for cls in type(layer).__mro__:
        if cls in _RULES:
            return _checked(_RULES[cls](layer, variable, per_head), cls, variable)
        if cls.__name__.endswith("Embedding"):
            return Route(None, f"embedding ({type(layer).__name__})")
    name = type(layer).__name__
    if _is_kernel(variable) and len(variable.shape) == 2:
        return _dense_route(variable, f"unknown layer type {name}: 2-D kernel as Dense")
    return Route(None, f"unknown layer type {name}")


def _checked(route, layer_type, variable):
    """`route`, if the rule registered for `layer_type` returned a valid one."""
    if not isinstance(route, Route):
        raise ValueError(
            f"The routing rule of {layer_type.__name__} must return a Route. "
            f"Received {route!r} for variable {variable.path}"
        )
    if route.view is not None and route.view.shape != tuple(variable.shape):
        raise ValueError(
            f"The routing rule of {layer_type.__name__} returned a view of "
            f"shape {route.view.shape} for variable {variable.path} of shape "
            f"{tuple(variable.shape)}"
        )
    return route


def route_without_layer(variable):
    """The route of a variable whose layer was not found."""
    if _is_kernel(variable) and len(variable.shape) == 2:
        return _dense_route(variable, "layer not found: 2-D kernel as Dense")
    return Route(None, "layer not found")


def _is_kernel(variable):
    return variable.name == "kernel"


def _dense_route(variable, reason):
    view = MatrixView.from_axes(variable.shape, inputs=(0,), outputs=(1,))
    return Route(view, reason)


def not_a_matrix(layer, variable):
    name = type(layer).__name__
    if variable.name == "bias" or variable.name.endswith("_bias"):
        return Route(None, f"{name} {variable.name}")
    if len(variable.shape) <= 1:
        return Route(None, f"{name} {len(variable.shape)}-D variable")
    if variable.name.startswith("lora_"):
        # The two factors of a low-rank update to a frozen matrix: see
        # "LoRA" in docs/routing.md for why they stay on AdamW.
        rank = min(variable.shape)
        return Route(None, f"{name} {variable.name}: LoRA factor of rank {rank}")
    return Route(None, f"{name} {variable.name}: not a weight matrix")


def _dense_rule(layer, variable, per_head):
    if _is_kernel(variable):
        return _dense_route(variable, "Dense kernel")
    return not_a_matrix(layer, variable)


def _einsum_dense_rule(layer, variable, per_head):
    if not _is_kernel(variable):
        return not_a_matrix(layer, variable)
    equation = layer.equation.replace(" ", "").replace("...", "")
    match = re.fullmatch(r"(\w*),(\w*)->(\w*)", equation)
    if not match or len(match.group(2)) != len(variable.shape):
        return Route(None, f"EinsumDense '{layer.equation}': unsupported")
    reads, kernel, writes = match.groups()
    blocks, inputs, outputs = [], [], []
    for axis, letter in enumerate(kernel):
        if letter in reads and letter in writes:
            blocks.append(axis)
        elif letter in reads:
            inputs.append(axis)
        elif letter in writes:
            outputs.append(axis)
        else:
            return Route(None, f"EinsumDense '{layer.equation}': unsupported")
    if not inputs or not outputs:
        return Route(None, f"EinsumDense '{layer.equation}': not a matrix")
    reason = f"EinsumDense '{layer.equation}'"
    # An attention projection has one model axis and (heads, head_dim) on
    # the other side; per head, the heads axis indexes blocks.
    if per_head and (len(inputs) == 1) != (len(outputs) == 1):
        heads_side = inputs if len(inputs) > 1 else outputs
        blocks.append(heads_side.pop(0))
        reason += " per head"
    view = MatrixView.from_axes(variable.shape, inputs, outputs, blocks)
    return Route(view, reason)


def _concatenated_outputs_view(shape, parts):
    """`shape` (k..., d_in, parts·n) as `parts` matrices (prod(k)·d_in, n).

    For kernels whose last axis concatenates the outputs of several
    matrices: conv groups, RNN gates.
    """
    *leading, columns = shape
    rank = len(leading)
    return MatrixView.from_axes(
        shape,
        inputs=range(rank),
        outputs=(rank + 1,),
        blocks=(rank,),
        split_shape=(*leading, parts, columns // parts),
    )


def _conv_rule(layer, variable, per_head):
    # kernel (k..., c_in/groups, c_out); group g owns c_out[g·n:(g+1)·n].
    if not _is_kernel(variable):
        return not_a_matrix(layer, variable)
    if variable.shape[-2] == 1 and variable.shape[-1] == layer.groups:
        # One channel in, one out per group (ConvNeXt's depthwise Conv2D):
        # each block is one filter, a vector, as in DepthwiseConv2D.
        return Route(None, f"{type(layer).__name__} depthwise kernel (groups=channels)")
    view = _concatenated_outputs_view(variable.shape, layer.groups)
    return Route(view, f"{type(layer).__name__} kernel")


def _conv_transpose_rule(layer, variable, per_head):
    # kernel (k..., c_out, c_in): reads c_in, writes k·c_out.
    if not _is_kernel(variable):
        return not_a_matrix(layer, variable)
    rank = len(variable.shape) - 2
    view = MatrixView.from_axes(
        variable.shape, inputs=(rank + 1,), outputs=range(rank + 1)
    )
    return Route(view, f"{type(layer).__name__} kernel")


def _separable_conv_rule(layer, variable, per_head):
    if variable.name == "pointwise_kernel":
        # (1..., c_in·multiplier, c_out)
        rank = len(variable.shape) - 2
        view = MatrixView.from_axes(
            variable.shape, inputs=range(rank + 1), outputs=(rank + 1,)
        )
        return Route(view, f"{type(layer).__name__} pointwise kernel")
    if variable.name == "depthwise_kernel":
        return Route(None, f"{type(layer).__name__} depthwise kernel")
    return not_a_matrix(layer, variable)


def _depthwise_conv_rule(layer, variable, per_head):
    if _is_kernel(variable):
        return Route(None, f"{type(layer).__name__} depthwise kernel")
    return not_a_matrix(layer, variable)


def _recurrent_rule(gates):
    def rule(layer, variable, per_head):
        # kernel (k..., d_in, gates·units) and recurrent_kernel
        # (k..., units, gates·units) concatenate one matrix per gate on the
        # last axis; k... are the kernel axes of a ConvLSTM.
        if variable.name not in ("kernel", "recurrent_kernel"):
            return not_a_matrix(layer, variable)
        view = _concatenated_outputs_view(variable.shape, gates)
        return Route(view, f"{type(layer).__name__} {variable.name}")

    return rule


def _wrapper_rule(layer, variable, per_head):
    # A wrapper (`SpectralNormalization`, ...) can hold the wrapped layer's
    # variables as its own: they are routed as the wrapped layer routes them.
    for owner in layer.layer._flatten_layers(include_self=True):
        if any(v is variable for v in owner._trainable_variables):
            return route_by_layer(owner, variable, per_head)
    return not_a_matrix(layer, variable)


def _adamw_rule(kind):
    def rule(layer, variable, per_head):
        return Route(None, f"{kind} ({type(layer).__name__})")

    return rule


_NORMALIZATION = _adamw_rule("normalization")
_RULES.update(
    {
        keras.layers.Embedding: _adamw_rule("embedding"),
        keras.layers.Dense: _dense_rule,
        keras.layers.EinsumDense: _einsum_dense_rule,
        keras.layers.Conv1D: _conv_rule,
        keras.layers.Conv2D: _conv_rule,
        keras.layers.Conv3D: _conv_rule,
        keras.layers.Conv1DTranspose: _conv_transpose_rule,
        keras.layers.Conv2DTranspose: _conv_transpose_rule,
        keras.layers.Conv3DTranspose: _conv_transpose_rule,
        keras.layers.SeparableConv1D: _separable_conv_rule,
        keras.layers.SeparableConv2D: _separable_conv_rule,
        keras.layers.DepthwiseConv1D: _depthwise_conv_rule,
        keras.layers.DepthwiseConv2D: _depthwise_conv_rule,
        keras.layers.LSTMCell: _recurrent_rule(gates=4),
        keras.layers.GRUCell: _recurrent_rule(gates=3),
        keras.layers.SimpleRNNCell: _recurrent_rule(gates=1),
        ConvLSTMCell: _recurrent_rule(gates=4),
        keras.layers.Wrapper: _wrapper_rule,
        keras.layers.BatchNormalization: _NORMALIZATION,
        keras.layers.LayerNormalization: _NORMALIZATION,
        keras.layers.GroupNormalization: _NORMALIZATION,
        keras.layers.RMSNormalization: _NORMALIZATION,
    }
)
