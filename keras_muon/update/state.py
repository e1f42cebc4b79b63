"""What the optimizer keeps for each trained variable, how that state is
made, and what the phases of its update pass from one to the next."""

import contextlib
import dataclasses
from typing import Any
from typing import NamedTuple

import keras
from keras import ops

from keras_muon.naming import is_lora_factor
from keras_muon.naming import state_name
from keras_muon.naming import variable_path
from keras_muon.update import momentum_storage
from keras_muon.update.rule import block_norms


@dataclasses.dataclass(frozen=True)
class VariableState:
    """The route of one trained variable and the state kept for it.

    Attributes:
        route: Muon with the variable's view (a `MatrixView`, or a
            `PartsView` for a fused kernel whose parts differ in shape), or
            AdamW (`route.view` is None).
        momentum: Muon's momentum `M`, or AdamW's first moment `m`. None
            for a variable the optimizer does not update (QK-Clip's logit
            probes, variables that Keras overwrites with their gradient).
        velocity: AdamW's second moment `v`; None on Muon's route.
        variant_state: A Muon variant's own state (NorMuon's and AdaMuon's
            second moments), or None; a tuple of each part's for a
            `PartsView` (`update.parts`).
        scale: The factor `s` of the Muon update of the variable's blocks
            (a tuple of each part's for a `PartsView`); None for AdamW.
        decays: Whether weight decay applies to it
            (`exclude_from_weight_decay`).
        radius: Hyperball's radius of each block, float32
            `(num_blocks,)`, or None without Hyperball.
        momentum_scales: The float32 scales of an int8 Muon momentum
            (`update.momentum_storage`), or None.
    """

    route: Any  # routing.views.Route
    momentum: Any = None
    velocity: Any = None
    variant_state: Any = None
    scale: float | None = None
    decays: bool = False
    radius: Any = None
    momentum_scales: Any = None

    @property
    def dtype(self):
        """The dtype the variable's update computes in: its momentum's,
        float32 for a momentum stored in bfloat16 or int8."""
        dtype = self.momentum.dtype
        return "float32" if dtype in ("bfloat16", "int8") else dtype


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


def add_muon_momentum(optimizer, variable, momentum_dtype):
    """Muon's momentum of `variable`, made by `optimizer`, stored in
    `momentum_dtype` (`update.momentum_storage`): `(momentum, scales)`,
    `scales` the float32 scale of each int8 block, else None."""
    if momentum_dtype == "float32":
        return add_moment(optimizer, variable, "momentum"), None
    layout = getattr(variable, "_layout", None)
    name = state_name(variable_path(variable), "momentum")
    momentum = optimizer.add_variable(
        shape=variable.shape, dtype=momentum_dtype, name=name, layout=layout
    )
    if momentum_dtype != "int8":
        return momentum, None
    *rows, length = variable.shape
    shape = (*rows, length // momentum_storage.block_size(length))
    if layout is not None:  # the last axis holds the blocks' scales, unsplit
        layout = keras.distribution.TensorLayout((*layout.axes[:-1], None), layout.device_mesh)
    return momentum, add_float32_state(optimizer, variable, "momentum_scales", shape, layout)


def add_float32_state(optimizer, variable, name, shape, layout=None):
    """A zero float32 state `name` of `shape`, made by `optimizer` and named
    after `variable`, as Keras names state made from a variable."""
    name = state_name(variable_path(variable), name)
    return optimizer.add_variable(shape=shape, dtype="float32", name=name, layout=layout)


def add_radius(optimizer, variable, view):
    """Hyperball's radius of each block of `variable` read by `view` (the
    blocks of each of its parts, in order), a float32 state `(num_blocks,)`
    made by `optimizer`, 0 until the first update sets it
    (`rule.hyperball`); None for a LoRA factor, which starts from zero
    (`lora_kernel_b`) and keeps the plain update. Raises a ValueError
    naming the variable if a block is zero now: it has no sphere to stay
    on."""
    if is_lora_factor(variable):
        return None
    path = variable_path(variable)
    with eager_scope():
        sections = view.split(ops.cast(variable, "float32"))
        norms = [block_norms(p.to_blocks(s)) for p, s in zip(view.parts, sections)]
        norms = ops.convert_to_numpy(ops.concatenate(norms) if len(norms) > 1 else norms[0])
    if not (norms > 0).all():
        raise ValueError(
            f"`hyperball=True` keeps each Muon matrix at its norm, but {path} "
            f"has {int((norms == 0).sum())} of {len(norms)} blocks of norm 0 "
            "(a zero-initialized kernel?). Initialize it with non-zero values, "
            "or leave it to AdamW with `exclude_layers`."
        )
    return optimizer.add_variable(
        shape=norms.shape,
        initializer="zeros",
        dtype="float32",
        name=state_name(path, "radius"),
        layout=block_state_layout(variable, view, norms.shape),
    )


def eager_scope():
    """Where the weights' values can be read: TensorFlow's `fit` builds the
    optimizer inside its traced train step, whose init scope is eager."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.init_scope()
    return contextlib.nullcontext()


def block_state_layout(variable, view, shape):
    """The layout, under `keras.distribution`, of a state of `shape` that
    indexes `variable`'s blocks as `(num_blocks, d_in or 1, d_out or 1)`,
    or `(num_blocks,)`: each axis sharded as `view.to_blocks` of the
    variable is, where it has more than one entry. None where the variable
    has no layout, or one that `MatrixView.blocks_layout` cannot carry."""
    layout = getattr(variable, "_layout", None)
    axes = None if layout is None else view.blocks_layout(layout.axes)
    if axes is None:
        return None
    axes = tuple(axis if size > 1 else None for axis, size in zip(axes, shape))
    return keras.distribution.TensorLayout(axes, layout.device_mesh) if any(axes) else None
