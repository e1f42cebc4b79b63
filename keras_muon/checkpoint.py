"""What keras_muon saves beside the optimizer's variables, the checks on
load, and state restored when the optimizer is built.

Keras saves an optimizer's variables in the order they were created and
loads them back by position. Which variables a keras_muon optimizer has
depends on its class and on each trained variable's route (an AdamW
variable has a momentum and a velocity, a Muon variable a momentum and its
variant's state), so the optimizer's store holds two more entries:

- `"routes"`: int8, one per trainable variable in order, 1 for Muon and 0
  for AdamW;
- `"class"`: int32, the code points of the optimizer's class name, with
  `(hyperball=True)` after it for an optimizer that keeps Hyperball's
  radii.

On load, nothing lands in the wrong slots: state saved by another
optimizer (no `"class"` entry), by another class, with other routes or
with another number of variables (`use_ema`, `gradient_accumulation_steps`,
QK-Clip) is refused with an error that says what differs and what to do.
State loaded before the optimizer is built (`compile()` then
`load_weights()`) is kept and restored when it is built, as
`tf.train.Checkpoint` restores on creation, instead of being dropped. A
store of an optimizer saved before it was built (its step counter and
learning rate only) loads as Keras loads it.

Keras's state tree (`get_state_tree` and `set_state_tree`, which
`keras.callbacks.OrbaxCheckpoint` and the loading of its checkpoints use)
saves and restores variables by path and never calls the optimizer. For
it, a built optimizer also holds a `LayoutRecord`: one more variable, with
the same facts and the optimizer's name, that refuses to be assigned
another optimizer's record.
"""

import weakref

import keras
import numpy as np
from keras import ops
from keras.src.backend.common.stateless_scope import in_stateless_scope  # not exported

from keras_muon.naming import variable_path
from keras_muon.update.state import eager_scope

ROUTES_KEY = "routes"
CLASS_KEY = "class"
# What an optimizer has before it is built: its step counter, and its
# learning rate unless that is a schedule.
UNBUILT_ENTRIES = 2
SWITCHING = (
    "To start this optimizer from the saved weights alone, load them without "
    "the optimizer's state: `keras.models.load_model(path, compile=False)` "
    "then `model.compile(optimizer=...)` for a .keras file, or "
    "`model.load_weights(path, objects_to_skip=[model.optimizer])` for a "
    ".weights.h5 file (docs/checkpoints.md)."
)


class LayoutRecord(keras.Variable):
    """The class, name and routes of a built optimizer, as one of its
    variables, int32: the class name's code points, 0, the optimizer's
    name's code points, 0, then the routes. Its path does not hold the
    optimizer's name, so that an optimizer restoring by path under another
    name still finds it. Assigning it another optimizer's record raises a
    ValueError that says what differs; it is left out of the positional
    store of `.keras` and `.weights.h5` files, which has `class` and
    `routes`."""

    def assign(self, value):
        optimizer = self._optimizer()
        # In a stateless scope (a traced step) the value is not known: it is
        # this record itself, carried through the step.
        if optimizer is not None and not in_stateless_scope():
            saved = np.asarray(ops.convert_to_numpy(value)).tolist()
            if saved != _record(optimizer):
                _check_record(optimizer, saved)
        super().assign(value)


def add_layout_record(optimizer):
    """Adds the `LayoutRecord` of `optimizer`, just built, to its variables."""
    # At `keras_muon/layout` whatever the scope of the build (TensorFlow's
    # `fit` builds inside the optimizer's scope, in its traced step).
    with eager_scope(), keras.name_scope("keras_muon", override_parent=""):
        value = np.array(_record(optimizer), "int32")
        # From an initializer: deferred, as the rest of the state, when the
        # optimizer is built in a stateless scope (a compile-only measure).
        record = LayoutRecord(
            lambda shape, dtype: value,
            shape=value.shape,
            dtype="int32",
            trainable=False,
            name="layout",
        )
    record._optimizer = weakref.ref(optimizer)
    optimizer._track_variable(record)


def positional_variables(optimizer):
    """`optimizer`'s variables that its `.keras` and `.weights.h5` store
    holds by position: all but its `LayoutRecord`."""
    return [v for v in optimizer.variables if not isinstance(v, LayoutRecord)]


def save(optimizer, store):
    """Writes `optimizer`'s variables to its `store` by position, as Keras
    does, and, once it is built, its routes and class name."""
    for i, variable in enumerate(positional_variables(optimizer)):
        store[str(i)] = variable.numpy()
    if optimizer.built:
        store[ROUTES_KEY] = ops.convert_to_tensor(_flags(optimizer), "int8")
        store[CLASS_KEY] = ops.convert_to_tensor(list(_class_name(optimizer).encode()), "int32")


def load(optimizer, store):
    """Loads `store` into `optimizer`, or keeps it for `restore_on_build`
    if the optimizer is not built yet. Raises a ValueError, before
    anything is assigned, if the store was not saved by an optimizer of
    `optimizer`'s class."""
    saved = _saved_state(optimizer, store)
    if not saved["values"]:
        return  # the file holds no state for this optimizer
    if saved["routes"] is None:  # saved before it was built: no moments yet
        _assign_unbuilt(optimizer, saved["values"])
    elif optimizer.built:
        _assign(optimizer, saved)
    else:
        optimizer._state_to_restore = saved


def restore_on_build(optimizer):
    """Assigns the state that `load` kept for `optimizer`, now built.

    Without such state, a step counter past 0 means that a checkpoint was
    restored by path before the build (a state tree, an Orbax checkpoint):
    it restored the counter alone, and the moments, which did not exist
    yet, would be lost. That is an error, unless `tf.train.Checkpoint`
    restores them as they are created."""
    saved, optimizer._state_to_restore = optimizer._state_to_restore, None
    with eager_scope():  # TensorFlow's `fit` builds inside its traced step
        if saved is not None:
            _assign(optimizer, saved)
            return
        steps = int(ops.convert_to_numpy(optimizer._iterations))
    restoring_on_creation = getattr(optimizer, "_self_update_uid", -1) >= 0  # TensorFlow's
    if steps and not restoring_on_creation:
        raise ValueError(
            f"{optimizer.name!r} is built at step {steps}, but none of its "
            "moments were restored: a checkpoint restored by path before the "
            "optimizer was built (an Orbax checkpoint, `set_state_tree`) restores "
            "the step counter alone. Build it before loading: "
            "`model.optimizer.build(model.trainable_variables)`, then load."
        )


def _saved_state(optimizer, store):
    """The store's variables by position, and its routes, once its class is
    `optimizer`'s; copied, since the file may close before they are used."""
    keys = list(store.keys())
    class_name = _class_name(optimizer)
    count = len([key for key in keys if key not in (ROUTES_KEY, CLASS_KEY)])
    values = [np.array(store[str(i)]) for i in range(count)]  # by position, as Keras saves
    if CLASS_KEY not in keys:
        if len(values) > UNBUILT_ENTRIES:
            raise ValueError(
                f"Cannot load this optimizer state into {class_name} "
                f"{optimizer.name!r}: it was not saved by a keras_muon optimizer "
                f"(its {len(values)} variables come without keras_muon's class "
                "entry). It was saved by another optimizer, such as "
                "keras.optimizers.AdamW, or by a LossScaleOptimizer (a "
                "mixed_float16 model: set `keras.mixed_precision."
                "set_global_policy('mixed_float16')` before loading it to "
                f"resume), and its moments would land in the wrong slots. {SWITCHING}"
            )
    else:
        _check_class(optimizer, bytes(int(c) for c in store[CLASS_KEY]).decode())
    routes = [int(flag) for flag in store[ROUTES_KEY]] if ROUTES_KEY in keys else None
    return {"values": values, "routes": routes}


def _assign(optimizer, saved):
    """Assigns `saved` to `optimizer`'s variables by position, once its
    routes and its number of variables are those of `optimizer`."""
    _check_routes(optimizer, saved["routes"])
    values, variables = saved["values"], positional_variables(optimizer)
    if len(values) != len(variables):
        raise ValueError(
            f"Cannot load this optimizer state into {optimizer.name!r}: it has "
            f"{len(values)} variables and this optimizer {len(variables)}. The "
            "options that add variables must be as when it was saved: `use_ema` "
            "(one average per trained variable; here "
            f"use_ema={optimizer.use_ema}), `gradient_accumulation_steps` "
            "(one accumulator per trained variable; here "
            f"gradient_accumulation_steps={optimizer.gradient_accumulation_steps}) "
            "and `momentum_dtype` (int8 keeps scales beside each Muon momentum; "
            f"here momentum_dtype={optimizer.momentum_dtype!r}); and the routes "
            "of fused projections, whose NorMuon and AdaMuon state is kept per "
            "part (docs/routing.md). " + SWITCHING
        )
    differing = [
        (variable_path(variable), tuple(value.shape), tuple(variable.shape))
        for variable, value in zip(variables, values)
        if tuple(value.shape) != tuple(variable.shape)
    ]
    if differing:
        path, saved_shape, shape = differing[0]
        raise ValueError(
            f"Cannot load this optimizer state into {optimizer.name!r}: "
            f"{len(differing)} of its variables have other shapes, e.g. {path} "
            f"{saved_shape} in the checkpoint and {shape} here. Muon reads their "
            "weights as other blocks than when it was saved: load with the "
            "options it was saved with (`per_head`), or, for a checkpoint saved "
            "before keras_muon read fused projections as their parts, declare "
            "them whole: `keras_muon.register_fused_projection(LayerType, "
            "attribute, lambda layer: None)` (docs/routing.md)."
        )
    for variable, value in zip(variables, values):
        variable.assign(value)


def _assign_unbuilt(optimizer, values):
    """Assigns the step counter and learning rate of an optimizer saved
    before it was built; its moments, had it been built, would be zero,
    as `optimizer`'s are."""
    rate = optimizer._learning_rate
    variables = [optimizer._iterations, *([rate] if isinstance(rate, keras.Variable) else [])]
    if len(values) != len(variables):
        raise ValueError(
            f"Cannot load this optimizer state into {optimizer.name!r}: it was "
            f"saved before it was built, with {len(values)} variables, and this "
            f"optimizer has {len(variables)} (a step counter, and a learning rate "
            "unless it is a schedule). Use a learning rate of the same kind as when "
            "it was saved."
        )
    for variable, value in zip(variables, values):
        variable.assign(value)


def _check_record(optimizer, saved):
    """Raises the error that says how the record `saved` differs from
    `optimizer`'s."""
    first, second = saved.index(0), saved.index(0, saved.index(0) + 1)
    class_name, name = bytes(saved[:first]).decode(), bytes(saved[first + 1 : second]).decode()
    _check_class(optimizer, class_name)
    if name != optimizer.name:
        raise ValueError(
            f"This optimizer state was saved by the optimizer named {name!r}, and "
            f"this one is named {optimizer.name!r}. Its variables are restored by "
            "their paths, which hold the optimizer's name, so none of its state "
            f"would be restored. Create the optimizer with name={name!r}."
        )
    _check_routes(optimizer, saved[second + 1 :])


def _check_class(optimizer, saved):
    class_name = _class_name(optimizer)
    if saved != class_name:
        raise ValueError(
            f"Cannot load this optimizer state into {class_name}: it was "
            f"saved by {saved}, whose state is laid out differently. Use "
            f"{saved} to resume. {SWITCHING}"
        )


def _check_routes(optimizer, saved):
    current = _flags(optimizer)
    if len(saved) != len(current):
        probes = len(optimizer._qk_clip.probes) if optimizer._qk_clip else 0
        if probes and len(saved) == len(current) - probes:
            cause = (
                "It was saved without QK-Clip: this optimizer adds a logit probe "
                f"per clipped attention layer ({probes}). Resume with "
                "qk_clip_threshold=None, as it was saved."
            )
        elif len(saved) > len(current):
            cause = (
                "Was it saved with QK-Clip (qk_clip_threshold set), which adds a "
                "logit probe per clipped attention layer, or for a larger model?"
            )
        else:
            cause = "Was it saved for another model?"
        raise ValueError(
            f"Cannot load this optimizer state: it was saved for {len(saved)} "
            f"trained variables, and this optimizer trains {len(current)}. {cause}"
        )
    if saved != current:
        paths = map(variable_path, optimizer._trainable_variables)
        differing = [path for path, a, b in zip(paths, saved, current) if a != b]
        raise ValueError(
            "Cannot load this optimizer state: it was saved with other "
            f"routes for {len(differing)} variables {differing[:5]}. Build the "
            "optimizer with the routing it was saved with (the same model, "
            f"`attach(model)`, `exclude_layers`, `lora`). {SWITCHING}"
        )


def _flags(optimizer):
    return [int(state.route.view is not None) for state in optimizer._states]


def _record(optimizer):
    """The values of `optimizer`'s `LayoutRecord`, as a list."""
    class_name, name = _class_name(optimizer).encode(), optimizer.name.encode()
    return [*class_name, 0, *name, 0, *_flags(optimizer)]


def _class_name(optimizer):
    """The name of the layout of `optimizer`'s state."""
    name = type(optimizer).__name__
    return f"{name}(hyperball=True)" if optimizer.hyperball else name
