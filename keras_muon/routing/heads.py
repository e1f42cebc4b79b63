"""Which variables produce a model's outputs: its output heads.

An output head (the classifier, the LM head) turns features into the
model's outputs, and Muon does worse than AdamW there, so its variables go
to AdamW. `output_heads` walks back from the model's outputs (a Functional
or Sequential model's graph; a subclassed model's `call`, traced on
symbolic inputs) to the layers that produce them; where the walk cannot
follow a layer, it guesses from the order of its sub-layers.
"""

import warnings

import keras
from keras import tree
from keras.src import backend as keras_backend  # compute_output_spec, not exported

from keras_muon.naming import variable_path
from keras_muon.routing.keras_layers import route_by_layer


def output_heads(model, trained):
    """Maps `id(variable)` to a reason, for the variables of output heads.

    `trained` holds the ids of the variables being trained: a guess looks
    only at layers that own some.
    """
    with _GraphRestored(model) as graph:
        walk = _HeadWalk(trained, graph)
        try:
            outputs = _symbolic_outputs(model)
            if outputs is None:
                outputs = graph.trace_model(model)
            if outputs is not None:
                walk.run(outputs)
                return walk.heads
        except Exception as e:  # a model this walk does not understand
            warnings.warn(
                f"keras_muon could not follow the outputs of {model.name!r} "
                f"({type(e).__name__}: {e}); its output heads are guessed.",
                stacklevel=2,
            )
        walk.heads.clear()
        walk.guess(model)
        return walk.heads


def _symbolic_outputs(model):
    """The output tensors of a Functional or built Sequential model, or None."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    # A subclassed model may have an attribute of that name.
    if not isinstance(outputs, (list, tuple, dict)) or not outputs:
        return None
    if not all(isinstance(t, keras.KerasTensor) for t in tree.flatten(outputs)):
        return None
    return outputs


# Operations that contract their operands: one with a constant matrix
# operand multiplies by weights computed outside the graph.
_CONTRACTIONS = ("Matmul", "Einsum", "Dot", "Tensordot", "Inner")


class _HeadWalk:
    """Finds the layers and variables that produce a model's outputs.

    Walks back from the outputs through operations that do not mix
    features (no weights, or 0-D/1-D weights only: activations, dropout,
    reshapes, pooling, normalization) and into nested models, following
    only the output they return. Through a merge (`Concatenate`, an `Add`
    of independent branches, ...) it follows every input. Tensors that
    are not floating point (masks, indices) carry no prediction and are
    not followed.

    The walk ends at:
    - a residual addition, where one input of an `Add` also feeds another
      (`x + f(x)`): the residual stream is the output, and a branch added
      into it is a hidden layer, so nothing is a head there; and so at a
      layer with sub-layers that cannot be traced and returns a tensor
      shaped as one of its inputs (a transformer block);
    - a layer with matrix weights and no sub-layers: the head;
    - an operation that takes a variable of 2 or more dimensions (the
      logits of a tied embedding, `ops.einsum("btd,vd->btv", x, table)`):
      that variable is the head;
    - a contraction with a constant matrix (`ops.matmul(x,
      ops.transpose(table))` evaluated outside the graph): the head's
      weights are not a layer's, so nothing is a head there.
    A layer with sub-layers, or a custom layer without weights, is traced:
    its `call` is run on symbolic stand-ins for the arguments of its node,
    and the walk goes on through the operations it really performs. If
    tracing fails, a composite layer's head is guessed (`guess`).
    """

    def __init__(self, trained, graph):
        self.trained = trained
        self.graph = graph
        self.heads = {}

    def run(self, outputs):
        """Walks back from `outputs`, recording the heads found."""
        # Keyed by id, holding the operation: a traced operation freed
        # during the walk would otherwise leave its id to another.
        visited = {}
        pending = list(tree.flatten(outputs))
        while pending:
            tensor = self.graph.outer_tensor(pending.pop())
            if not _carries_prediction(tensor):
                continue
            operation, node_index, tensor_index = tensor._keras_history
            if (id(operation), node_index, tensor_index) in visited:
                continue
            visited[id(operation), node_index, tensor_index] = operation
            node = operation._inbound_nodes[node_index]
            pending.extend(self._visit(operation, node, tensor_index))

    def _visit(self, operation, node, tensor_index):
        """Records the heads `operation` ends in; returns the tensors to
        follow from its output `tensor_index`."""
        nested_outputs = _symbolic_outputs(operation)
        if nested_outputs is not None:
            return [tree.flatten(nested_outputs)[tensor_index]]
        matrices = [
            arg
            for arg in tree.flatten((node.arguments.args, node.arguments.kwargs))
            if isinstance(arg, keras.Variable) and len(arg.shape) > 1
        ]
        if matrices:
            name = type(operation).__name__
            for variable in matrices:
                reason = f"output head ({name} with {variable_path(variable)})"
                self.heads[id(variable)] = reason
            return []
        if type(operation).__name__ in _CONTRACTIONS and _has_constant_matrix(node):
            return []
        if _should_trace(operation):
            traced = self.graph.trace_call(operation, node)
            if traced is not None:
                return [tree.flatten(traced)[tensor_index]]
            if not operation.weights and not _computes_floats(operation, node, tensor_index):
                return []
        if not _mixes_features(operation):
            if _is_residual_addition(operation, node):
                # The residual stream is the output, not a branch added to it.
                return []
            inputs = [t for t in node.input_tensors if _carries_prediction(t)]
            return _without_skip_connections(inputs)
        if operation._layers and _returns_an_input_shape(node, tensor_index):
            # An untraced block that returns a tensor shaped as one of its
            # inputs is taken for a residual block (a transformer layer).
            return []
        if not (operation._layers and self.guess(operation)):
            self._add_head(operation)
        return []

    def _add_head(self, layer, container=None):
        described = f"{type(layer).__name__} '{layer.name}'"
        if container is None:
            reason = f"output head ({described})"
        else:
            reason = (
                f"output head (guessed: {described}, the last projection "
                f"of {type(container).__name__} '{container.name}')"
            )
        self.heads.update((id(v), reason) for v in layer.trainable_variables)

    def guess(self, container):
        """Best guess at the output head of a layer that cannot be traced.

        Goes through the sub-layers in attribute order from the last,
        skipping those that own no trained variable, and takes the first
        that has a Muon matrix, descending into containers; a functional
        sub-model answers from its own outputs. Returns whether a head was
        found.
        """
        for child in reversed(container._layers):
            if not self.trained & {id(v) for v in child.trainable_variables}:
                continue
            outputs = _symbolic_outputs(child)
            if outputs is not None:
                self.run(outputs)
                return True
            if any(
                id(v) in self.trained and route_by_layer(child, v, per_head=False).view is not None
                for v in child._trainable_variables
            ):
                self._add_head(child, container)
                return True
            if self.guess(child):
                return True
        return False


def _carries_prediction(tensor):
    """Whether `tensor` is computed in the graph (not an input) and floating
    point: masks and indices are not predictions."""
    return _producer(tensor) is not None and keras.backend.is_float_dtype(tensor.dtype)


def _producer(tensor):
    """The operation that computed symbolic `tensor`, or None for an input
    (Keras gives an input without history one without an operation)."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def _computes_floats(layer, node, tensor_index):
    """Whether output `tensor_index` of `layer` at `node` really is floating
    point: a layer that declares only its output shape gets its compute
    dtype declared, whatever its `call` returns (a boolean mask)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = keras_backend.compute_output_spec(
                layer.call, *node.arguments.args, **node.arguments.kwargs
            )
    except Exception:  # any failure of user code: trust the declaration
        return True
    return keras.backend.is_float_dtype(tree.flatten(spec)[tensor_index].dtype)


def _has_constant_matrix(node):
    return any(
        not isinstance(arg, keras.KerasTensor) and len(getattr(arg, "shape", ())) > 1
        for arg in tree.flatten(node.arguments.args)
    )


def _mixes_features(operation):
    return any(len(w.shape) > 1 for w in getattr(operation, "weights", ()))


def _should_trace(operation):
    """Whether the walk goes inside `operation` rather than around it: a
    layer with sub-layers, or a weightless layer not from Keras (whose
    output may depend on its inputs only through their shapes)."""
    if not isinstance(operation, keras.Layer):
        return False
    if operation._layers:
        return True
    own_module = type(operation).__module__.split(".")[0] == "keras"
    return not operation.weights and not own_module


def _returns_an_input_shape(node, tensor_index):
    """Whether output `tensor_index` of `node` has the shape of one of its
    floating-point inputs."""
    shape = tuple(tree.flatten(node.outputs)[tensor_index].shape)
    inputs = [t for t in node.input_tensors if keras.backend.is_float_dtype(t.dtype)]
    return any(tuple(t.shape) == shape for t in inputs)


def _is_residual_addition(operation, node):
    """Whether `operation` adds branches into a residual stream: an
    addition one of whose floating-point operands (a model input, or a
    computed tensor) is upstream of another."""
    if type(operation).__name__ != "Add":
        return False
    operands = [t for t in node.input_tensors if keras.backend.is_float_dtype(t.dtype)]
    return len(_without_skip_connections(operands)) < len(operands)


def _without_skip_connections(tensors):
    """`tensors` less those that are also upstream of another of them."""
    if len(tensors) < 2:
        return tensors
    upstream = [_upstream(t) for t in tensors]
    return [
        t
        for i, t in enumerate(tensors)
        if not any(id(t) in up for j, up in enumerate(upstream) if j != i)
    ]


def _upstream(tensor):
    """The ids of every symbolic tensor that `tensor` is computed from."""
    seen = set()
    pending = [tensor]
    while pending:
        tensor = pending.pop()
        if _producer(tensor) is None:
            continue
        history = tensor._keras_history
        node = history.operation._inbound_nodes[history.node_index]
        for parent in tree.flatten(node.input_tensors):
            if id(parent) not in seen:
                seen.add(id(parent))
                pending.append(parent)
    return seen


class _GraphRestored:
    """Traces `call` methods on symbolic tensors, and on exit restores the
    node lists of the model's layers, which tracing appends to.

    A traced call runs on fresh symbolic inputs shaped like the node's
    arguments; `outer_tensor` maps each back to the argument it stands for.
    It runs in a stateless scope: variables it assigns keep their values.
    """

    def __init__(self, model):
        self._saved = [
            (layer, len(layer._inbound_nodes), len(layer._outbound_nodes))
            for layer in model._flatten_layers(include_self=True, recursive=True)
        ]
        self._outer = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for layer, inbound, outbound in self._saved:
            del layer._inbound_nodes[inbound:]
            del layer._outbound_nodes[outbound:]

    def outer_tensor(self, tensor):
        """The tensor that `tensor`, an input of a traced call, stands for."""
        return self._outer.get(id(tensor), (tensor, tensor))[1]

    def _stand_in(self, value, shape):
        # Keeps the stand-in alive with its entry, so that its id stays its.
        tensor = keras.KerasTensor(shape, value.dtype)
        self._outer[id(tensor)] = (tensor, self.outer_tensor(value))
        return tensor

    def trace_call(self, layer, node):
        """`layer.call` run on inputs like the arguments of `node`, or None
        if it fails."""
        args, kwargs = tree.map_structure(
            lambda value: (
                self._stand_in(value, value.shape)
                if isinstance(value, keras.KerasTensor)
                else value
            ),
            (node.arguments.args, node.arguments.kwargs),
        )
        outputs = self._call(layer, args, kwargs)
        if outputs is None or len(tree.flatten(outputs)) != len(node.outputs):
            return None
        return outputs

    def trace_model(self, model):
        """The outputs of a built subclassed `model` called on symbolic
        inputs of the shapes it was built with, or None."""
        shapes = getattr(model, "_build_shapes_dict", None)
        if not shapes or not model.built:
            return None
        # The input dtype is not recorded: features, else token ids.
        for dtype in ("float32", "int32"):
            inputs = [
                keras.tree.map_shape_structure(
                    lambda shape, dtype=dtype: keras.KerasTensor(shape, dtype), shape
                )
                for shape in shapes.values()
            ]
            outputs = self._call(model, inputs, {})
            if outputs is not None and any(_carries_prediction(t) for t in tree.flatten(outputs)):
                return outputs
        return None

    def _call(self, layer, args, kwargs):
        """`layer.call(*args, **kwargs)` on symbolic tensors, retried with
        unknown dimensions set (code that needs a length to run), or None."""
        for known in (False, True):
            if known:
                args, kwargs = tree.map_structure(self._known_shape, (args, kwargs))
            try:
                with warnings.catch_warnings(), keras.StatelessScope():
                    warnings.simplefilter("ignore")
                    outputs = layer.call(*args, **kwargs)
            except Exception:  # any failure of user code means "cannot trace"
                continue
            if any(isinstance(t, keras.KerasTensor) for t in tree.flatten(outputs)):
                return outputs
        return None

    def _known_shape(self, value, size=8):
        """A stand-in for `value` with each unknown dimension set to `size`,
        if `value` is a symbolic tensor with some; else `value`."""
        if not isinstance(value, keras.KerasTensor) or None not in value.shape:
            return value
        return self._stand_in(value, tuple(size if d is None else d for d in value.shape))
