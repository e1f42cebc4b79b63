"""Routes each trainable variable to Muon or AdamW from the layer that owns it.

The optimizer sees only variables; routing needs their layers. The model is
found when the optimizer is built: `Model.fit` (and `train_on_batch`,
`load_model`, ...) builds it from a method of the compiled model, which is
on the call stack. In a custom training loop, `Muon.attach(model)` names it.
"""

import re
import sys

import keras
from keras import tree

from keras_muon.matrix_views import Route
from keras_muon.matrix_views import route_by_layer
from keras_muon.matrix_views import route_without_layer


def find_model(optimizer, variables):
    """The layer or model whose variables `optimizer` is being built for.

    Looks through the local variables of the calling frames for, first, a
    model compiled with `optimizer` (possibly wrapped in a
    `LossScaleOptimizer`), then the smallest layer owning all of `variables`.

    Returns:
        A `keras.Layer`, or None.
    """
    wanted = {id(v) for v in variables}
    owners_of_all = []
    seen = set()
    frame = sys._getframe(1)
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if not _is_layer(value) or id(value) in seen:
                continue
            seen.add(id(value))
            compiled = getattr(value, "optimizer", None)
            inner = getattr(compiled, "inner_optimizer", None)
            if compiled is optimizer or inner is optimizer:
                return value
            if wanted <= {id(v) for v in _trainable_variables(value)}:
                owners_of_all.append(value)
        frame = frame.f_back
    if not owners_of_all:
        return None
    # Prefer the most specific owner; among equals, the outermost one.
    return min(
        owners_of_all,
        key=lambda layer: (
            len(layer.trainable_variables),
            -len(layer._flatten_layers(include_self=True)),
        ),
    )


def _is_layer(value):
    try:
        return isinstance(value, keras.Layer)
    except Exception:  # a proxy object whose __class__ lookup fails
        return False


def _trainable_variables(layer):
    try:
        return layer.trainable_variables
    except AttributeError:  # a layer still in its __init__
        return []


def route_variables(variables, model, per_head=False, exclude_layers=()):
    """One `Route` per variable.

    Args:
        variables: The trainable variables, in the optimizer's order.
        model: The layer or model that owns them, or None if unknown.
        per_head: Whether attention projections are split by head.
        exclude_layers: Compiled regexes; a variable whose path matches one
            goes to AdamW.

    Returns:
        A list of `Route`, aligned with `variables`.
    """
    owners = _owners(model) if model is not None else {}
    trained = {id(v) for v in variables}
    heads = _output_heads(model, trained) if model is not None else {}
    routes = []
    for variable in variables:
        excluded = [p.pattern for p in exclude_layers if p.search(variable.path)]
        if excluded:
            routes.append(Route(None, f"exclude_layers {excluded[0]!r}"))
        elif id(variable) in heads:
            routes.append(Route(None, heads[id(variable)]))
        elif id(variable) in owners:
            routes.append(_route_shared(variable, owners[id(variable)], per_head))
        else:
            routes.append(route_without_layer(variable))
    return routes


def _route_shared(variable, layers, per_head):
    # A variable shared by several layers (tied weights) goes to AdamW if
    # any of them says so: an embedding tied to an output projection stays
    # an embedding.
    routes = [route_by_layer(layer, variable, per_head) for layer in layers]
    return next((r for r in routes if r.view is None), routes[0])


def _owners(model):
    """Maps `id(variable)` to the layers that hold it directly."""
    owners = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for variable in layer._trainable_variables:
            owners.setdefault(id(variable), []).append(layer)
    return owners


def _output_heads(model, trained):
    """Maps `id(variable)` to a reason, for the variables of output heads.

    `trained` holds the ids of the variables being trained: a guess looks
    only at layers that own some.
    """
    outputs = _symbolic_outputs(model)
    if outputs is None:
        found = _guessed_heads(model, trained)
    else:
        found = _layers_producing(outputs, trained)
    heads = {}
    for layer, container in found:
        described = f"{type(layer).__name__} '{layer.name}'"
        if container is None:
            reason = f"output head ({described})"
        else:
            reason = (
                f"output head (guessed: {described}, the last projection "
                f"of {type(container).__name__} '{container.name}')"
            )
        heads.update((id(v), reason) for v in layer.trainable_variables)
    return heads


def _symbolic_outputs(model):
    """The output tensors of a Functional or built Sequential model, or None."""
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    return outputs or None


def _layers_producing(outputs, trained):
    """`(layer, container)` for each layer whose outputs are `outputs`.

    Walks back through operations that do not mix features (no weights, or
    0-D/1-D weights only: activations, dropout, reshapes, pooling,
    normalization) and into nested models, following only the output they
    return. Through a merge (`Add`, `Concatenate`, ...) it follows every
    input but skip connections: an input that also feeds another input of
    the merge. `container` is None when the layer is known to be the head,
    or the layer whose last projection was guessed.
    """
    found = []
    visited = set()
    pending = list(tree.flatten(outputs))
    while pending:
        history = getattr(pending.pop(), "_keras_history", None)
        if history is None:
            continue
        operation, node_index, tensor_index = history
        if (id(operation), node_index, tensor_index) in visited:
            continue
        visited.add((id(operation), node_index, tensor_index))
        nested_outputs = _symbolic_outputs(operation)
        if nested_outputs is not None:
            pending.append(tree.flatten(nested_outputs)[tensor_index])
        elif _mixes_features(operation):
            guessed = _guessed_heads(operation, trained) if operation._layers else []
            found.extend(guessed or [(operation, None)])
        else:
            node = operation._inbound_nodes[node_index]
            pending.extend(_without_skip_connections(tree.flatten(node.input_tensors)))
    return found


def _mixes_features(operation):
    return any(len(w.shape) > 1 for w in getattr(operation, "weights", ()))


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
        history = getattr(pending.pop(), "_keras_history", None)
        if history is None:
            continue
        node = history.operation._inbound_nodes[history.node_index]
        for parent in tree.flatten(node.input_tensors):
            if id(parent) not in seen:
                seen.add(id(parent))
                pending.append(parent)
    return seen


def _guessed_heads(container, trained):
    """Best guess at the output head of a layer that has no graph.

    Goes through the sub-layers in attribute order from the last, skipping
    those that own no trained variable, and takes the first that has a Muon
    matrix, descending into containers; a functional sub-model answers from
    its own outputs.
    """
    for child in reversed(container._layers):
        if not trained & {id(v) for v in child.trainable_variables}:
            continue
        outputs = _symbolic_outputs(child)
        if outputs is not None:
            return _layers_producing(outputs, trained)
        if any(
            id(v) in trained and route_by_layer(child, v, per_head=False).view is not None
            for v in child._trainable_variables
        ):
            return [(child, container)]
        found = _guessed_heads(child, trained)
        if found:
            return found
    return []


def compile_patterns(exclude_layers):
    """`exclude_layers` (None, a regex or a list of regexes) compiled."""
    if exclude_layers is None:
        return ()
    if isinstance(exclude_layers, str):
        exclude_layers = [exclude_layers]
    patterns = []
    for pattern in exclude_layers:
        try:
            patterns.append(re.compile(pattern))
        except (TypeError, re.error) as e:
            raise ValueError(
                "`exclude_layers` must be a list of regular expressions. "
                f"Received {pattern!r}: {e}"
            ) from None
    return tuple(patterns)
