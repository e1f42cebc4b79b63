"""The routing rules of Keras's own layers, and the registry of rules.

Per layer type, a rule `rule(layer, variable, per_head) -> Route` decides
whether a variable that the layer created goes to Muon, with the
`MatrixView` that reads it as `(d_in, d_out)` blocks, or to AdamW, with a
reason. The rules of Keras's layers are registered here;
`register_layer_rule` declares another library's, and `routing.keras_hub`
keras-hub's.
"""

import re

import keras
from keras.src.layers.rnn.conv_lstm import ConvLSTMCell  # not exported by Keras

from keras_muon.naming import is_lora_factor
from keras_muon.naming import lora_rank
from keras_muon.registry import LayerRegistry
from keras_muon.routing.views import MatrixView
from keras_muon.routing.views import Route

MATRIX_RULES = LayerRegistry()


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
    MATRIX_RULES.register(layer_type, rule)


def route_by_layer(layer, variable, per_head):
    """The route of `variable`, created by `layer`, from the layer's type.

    The most specific class of `layer` with a registered rule decides. A
    class named `...Embedding` without one is an embedding: embedding layers
    of other libraries (keras-hub's `PositionEmbedding`, ...) need not
    subclass Keras's, but are named for what they are.
    """
    for cls, rule in MATRIX_RULES.classes_and_rules(layer):
        if rule is not None:
            return _checked(rule(layer, variable, per_head), cls, variable)
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
    return Route(MatrixView.dense(variable.shape), reason)


def not_a_matrix(layer, variable):
    name = type(layer).__name__
    if variable.name == "bias" or variable.name.endswith("_bias"):
        return Route(None, f"{name} {variable.name}")
    if len(variable.shape) <= 1:
        return Route(None, f"{name} {len(variable.shape)}-D variable")
    if is_lora_factor(variable):
        return Route(None, f"{name} {variable.name}: LoRA factor of rank {lora_rank(variable)}")
    return Route(None, f"{name} {variable.name}: not a weight matrix")


def _dense_rule(layer, variable, per_head):
    # A LoRA factor is a matrix of its own: `lora_kernel_a` (d_in, r),
    # `lora_kernel_b` (r, d_out).
    if _is_kernel(variable) or is_lora_factor(variable):
        return _dense_route(variable, _kind(variable, "Dense kernel"))
    return not_a_matrix(layer, variable)


def _einsum_dense_rule(layer, variable, per_head):
    if not (_is_kernel(variable) or is_lora_factor(variable)):
        return not_a_matrix(layer, variable)
    axes = _einsum_kernel_axes(layer.equation, len(layer.kernel.shape))
    if isinstance(axes, str):
        return Route(None, f"EinsumDense '{layer.equation}': {axes}")
    if variable.name == "lora_kernel_b":
        # (r, the kernel's last axis), in place of that axis.
        return _dense_route(variable, _kind(variable, f"EinsumDense '{layer.equation}'"))
    blocks, inputs, outputs = axes
    if variable.name == "lora_kernel_a":
        # The kernel's axes but the last, replaced by the rank: an output.
        last = len(variable.shape) - 1
        blocks, inputs, outputs = ([a for a in group if a != last] for group in axes)
        outputs.append(last)
    reason = _kind(variable, f"EinsumDense '{layer.equation}'")
    # An attention projection has one model axis and (heads, head_dim) on
    # the other side; per head, the heads axis indexes blocks.
    if per_head and (len(inputs) == 1) != (len(outputs) == 1):
        heads_side = inputs if len(inputs) > 1 else outputs
        blocks.append(heads_side.pop(0))
        reason += " per head"
    return Route(MatrixView.from_axes(variable.shape, inputs, outputs, blocks), reason)


def _einsum_kernel_axes(equation, rank):
    """`(blocks, inputs, outputs)`: the axes of an `EinsumDense` kernel of
    `rank` that index independent matrices (shared by input and output),
    that the layer reads and that it writes; or why it is no matrix."""
    equation = equation.replace(" ", "").replace("...", "")
    match = re.fullmatch(r"(\w*),(\w*)->(\w*)", equation)
    if not match or len(match.group(2)) != rank:
        return "unsupported"
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
            return "unsupported"
    if not inputs or not outputs:
        return "not a matrix"
    return blocks, inputs, outputs


def _kind(variable, kernel):
    """How the table names a kernel, or one of its LoRA factors."""
    if is_lora_factor(variable):
        return f"LoRA factor {variable.name} of {kernel} (rank {lora_rank(variable)})"
    return kernel


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
    view = MatrixView.from_axes(variable.shape, inputs=(rank + 1,), outputs=range(rank + 1))
    return Route(view, f"{type(layer).__name__} kernel")


def _separable_conv_rule(layer, variable, per_head):
    if variable.name == "pointwise_kernel":
        # (1..., c_in·multiplier, c_out)
        rank = len(variable.shape) - 2
        view = MatrixView.from_axes(variable.shape, inputs=range(rank + 1), outputs=(rank + 1,))
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
MATRIX_RULES.register_defaults(
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
