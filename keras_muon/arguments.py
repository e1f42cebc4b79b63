"""Checks of optimizer arguments, with errors that name the argument."""

import math
import numbers

import keras


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


def boolean(arg, value):
    if not isinstance(value, bool):
        raise ValueError(f"`{arg}` must be True or False. Received: {arg}={value!r}")
    return value


def layer_rule(layer_type, rule):
    """Checks the arguments of a rule registration: `layer_type` a
    `keras.Layer` subclass, `rule` callable."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, keras.Layer)):
        raise ValueError(
            f"`layer_type` must be a keras.Layer subclass. Received: {layer_type!r}"
        )
    if not callable(rule):
        raise ValueError(f"`rule` must be callable. Received: {rule!r}")
