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
"""

import keras
import numpy as np
from keras import ops

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


def save_layout(optimizer, store):
    """Adds the routes and the class name of a built `optimizer` to its
    `store`."""
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
    """Assigns the state that `load` kept for `optimizer`, now built."""
    saved, optimizer._state_to_restore = optimizer._state_to_restore, None
    if saved is not None:
        with eager_scope():  # TensorFlow's `fit` builds inside its traced step
            _assign(optimizer, saved)


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
        saved = bytes(int(c) for c in store[CLASS_KEY]).decode()
        if saved != class_name:
            raise ValueError(
                f"Cannot load this optimizer state into {class_name}: it was "
                f"saved by {saved}, whose state is laid out differently. Use "
                f"{saved} to resume. {SWITCHING}"
            )
    routes = [int(flag) for flag in store[ROUTES_KEY]] if ROUTES_KEY in keys else None
    return {"values": values, "routes": routes}


def _assign(optimizer, saved):
    """Assigns `saved` to `optimizer`'s variables by position, once its
    routes and its number of variables are those of `optimizer`."""
    _check_routes(optimizer, saved["routes"])
    values, variables = saved["values"], optimizer.variables
    if len(values) != len(variables):
        raise ValueError(
            f"Cannot load this optimizer state into {optimizer.name!r}: it has "
            f"{len(values)} variables and this optimizer {len(variables)}. The "
            "options that add variables must be as when it was saved: `use_ema` "
            "(one average per trained variable; here "
            f"use_ema={optimizer.use_ema}) and `gradient_accumulation_steps` "
            "(one accumulator per trained variable; here "
            f"gradient_accumulation_steps={optimizer.gradient_accumulation_steps}). " + SWITCHING
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


def _class_name(optimizer):
    """The name of the layout of `optimizer`'s state."""
    name = type(optimizer).__name__
    return f"{name}(hyperball=True)" if optimizer.hyperball else name
