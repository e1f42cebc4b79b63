"""What the optimizer keeps for each trained variable, how that state is
made, and what the phases of its update pass from one to the next."""

import dataclasses
from typing import Any
from typing import NamedTuple

from keras_muon.naming import state_name
from keras_muon.naming import variable_path


@dataclasses.dataclass(frozen=True)
class VariableState:
    """The route of one trained variable and the state kept for it.

    Attributes:
        route: Muon with the variable's `MatrixView`, or AdamW
            (`route.view` is None).
        momentum: Muon's momentum `M`, or AdamW's first moment `m`. None
            for a variable the optimizer does not update (QK-Clip's logit
            probes, variables that Keras overwrites with their gradient).
        velocity: AdamW's second moment `v`; None on Muon's route.
        variant_state: A Muon variant's own state (NorMuon's and AdaMuon's
            second moments), or None.
        scale: The factor `s` of the Muon update of the variable's blocks;
            None for AdamW.
        decays: Whether weight decay applies to it
            (`exclude_from_weight_decay`).
    """

    route: Any  # routing.views.Route
    momentum: Any = None
    velocity: Any = None
    variant_state: Any = None
    scale: float | None = None
    decays: bool = False


class Entry(NamedTuple):
    """One variable in one update: the variable as the update received it
    (a backend variable under `tf.distribute`), its gradient, its state."""

    variable: Any
    gradient: Any
    state: VariableState


def add_moment(optimizer, variable, name):
    """A zero state `name` of `variable`'s shape and layout, made by
    `optimizer`: in the variable's dtype, or float32 for a 16-bit variable,
    whose moments would lose the update (float16 squares of small
    gradients underflow; bfloat16 rounds adam_beta_2=0.999 to 1)."""
    if variable.dtype not in ("float16", "bfloat16"):
        return optimizer.add_variable_from_reference(variable, name)
    layout = getattr(variable, "_layout", None)
    return add_float32_state(optimizer, variable, name, variable.shape, layout)


def add_float32_state(optimizer, variable, name, shape, layout=None):
    """A zero float32 state `name` of `shape`, made by `optimizer` and named
    after `variable`, as Keras names state made from a variable."""
    name = state_name(variable_path(variable), name)
    return optimizer.add_variable(shape=shape, dtype="float32", name=name, layout=layout)
