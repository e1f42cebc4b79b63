"""Routes each trainable variable to Muon or AdamW from the layer that owns it.

The optimizer sees only variables; routing needs their layers. The model is
found when the optimizer is built: `Model.fit` (and `train_on_batch`,
`load_model`, ...) builds it from a method of the compiled model, which is
on the call stack. In a custom training loop, `Muon.attach(model)` names it.
"""

import re
import sys
import weakref

import keras

from keras_muon.naming import is_lora_factor
from keras_muon.naming import variable_path
from keras_muon.routing import fused
from keras_muon.routing import keras_hub
from keras_muon.routing.heads import output_heads
from keras_muon.routing.keras_layers import route_by_layer
from keras_muon.routing.keras_layers import route_without_layer
from keras_muon.routing.views import Route


def attached(optimizer, model):
    """A weak reference to `model`, which `optimizer.attach(model)` names
    before the optimizer is built; a ValueError otherwise."""
    if not isinstance(model, keras.Layer):
        raise ValueError(f"`attach` expects a keras.Model or keras.Layer. Received: {model!r}")
    if optimizer.built:
        raise ValueError(
            "`attach` must be called before the optimizer is built: "
            "routing is decided at build time. Create a new optimizer."
        )
    return weakref.ref(model)


def find_model(optimizer, variables):
    """The layer or model whose variables `optimizer` is being built for.

    The model named by `optimizer.attach(model)`, if it is alive; else it
    looks through the local variables of the calling frames for, first, a
    model compiled with `optimizer` (possibly wrapped in a
    `LossScaleOptimizer`), then the smallest layer owning all of `variables`.

    Returns:
        A `keras.Layer`, or None.
    """
    attached = optimizer._attached_model() if optimizer._attached_model else None
    if attached is not None:
        return attached
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


def route_variables(variables, model, per_head=False, exclude_layers=(), lora="muon"):
    """One `Route` per variable.

    Args:
        variables: The trainable variables, in the optimizer's order.
        model: The layer or model that owns them, or None if unknown.
        per_head: Whether attention projections are split by head.
        exclude_layers: Compiled regexes; a variable whose path matches one
            goes to AdamW.
        lora: `"muon"`: the LoRA factors of `Dense` and `EinsumDense`
            kernels go to Muon, each a matrix of its own; `"adamw"`: to
            AdamW.

    Returns:
        A list of `Route`, aligned with `variables`.
    """
    keras_hub.register_if_imported()
    owners = _owners(model) if model is not None else {}
    fused_kernels = fused.fused_kernels(model) if model is not None else {}
    trained = {id(v) for v in variables}
    heads = output_heads(model, trained) if model is not None else {}
    routes = []
    for variable in variables:
        path = variable_path(variable)
        excluded = [p.pattern for p in exclude_layers if p.search(path)]
        if excluded:
            routes.append(Route(None, f"exclude_layers {excluded[0]!r}"))
        elif id(variable) in heads:
            routes.append(Route(None, heads[id(variable)]))
        elif id(variable) in owners:
            route = _route_shared(variable, owners[id(variable)], per_head, fused_kernels)
            if lora == "adamw" and is_lora_factor(variable) and route.view is not None:
                route = Route(None, f"{route.reason}, lora='adamw'")
            routes.append(route)
        else:
            routes.append(route_without_layer(variable))
    return routes


def _route_shared(variable, layers, per_head, fused_kernels):
    # A variable shared by several layers (tied weights) goes to AdamW if
    # any of them says so: an embedding tied to an output projection stays
    # an embedding.
    routes = [_route_of(layer, variable, per_head, fused_kernels) for layer in layers]
    return next((r for r in routes if r.view is None), routes[0])


def _route_of(layer, variable, per_head, fused_kernels):
    """The route of `variable`, created by `layer`: the kernel of a fused
    projection as its parts (`routing.fused`), others by the layer's rule."""
    declaration = fused_kernels.get(id(layer))
    if declaration is None or variable.name != "kernel":
        return route_by_layer(layer, variable, per_head)
    return fused.split_route(
        route_by_layer(layer, variable, False), variable, declaration, per_head
    )


def _owners(model):
    """Maps `id(variable)` to the layers that hold it directly."""
    owners = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for variable in layer._trainable_variables:
            owners.setdefault(id(variable), []).append(layer)
    return owners


LORA = ("muon", "adamw")


def checked_lora(lora):
    """`lora`, or a ValueError naming the argument if it is not in `LORA`."""
    if lora not in LORA:
        raise ValueError(f"`lora` must be one of {LORA}. Received: lora={lora!r}")
    return lora


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
                f"`exclude_layers` must be a list of regular expressions. Received {pattern!r}: {e}"
            ) from None
    return tuple(patterns)
