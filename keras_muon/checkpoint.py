"""What keras_muon saves beside the optimizer's variables, and the check
on load.

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

On load, state saved by another class or with other routes is refused,
with an error that says what differs, instead of putting moments into the
wrong variables. A store without these entries (an optimizer saved before
it was built) loads as Keras loads it.
"""

from keras import ops

from keras_muon.naming import variable_path

ROUTES_KEY = "routes"
CLASS_KEY = "class"


def save_layout(optimizer, store):
    """Adds the routes and the class name of a built `optimizer` to its
    `store`."""
    if optimizer.built:
        store[ROUTES_KEY] = ops.convert_to_tensor(_flags(optimizer), "int8")
        store[CLASS_KEY] = ops.convert_to_tensor(list(_class_name(optimizer).encode()), "int32")


def checked(optimizer, store):
    """The entries of `store` that Keras loads into `optimizer`, once the
    saved class and routes are those of `optimizer` (the routes are
    compared once it is built)."""
    keys = list(store.keys())
    class_name = _class_name(optimizer)
    if CLASS_KEY in keys:
        saved = bytes(int(c) for c in store[CLASS_KEY]).decode()
        if saved != class_name:
            raise ValueError(
                f"Cannot load this optimizer state into {class_name}: it was "
                f"saved by {saved}, whose state is laid out differently. Use "
                f"{saved} to resume."
            )
    if optimizer.built and ROUTES_KEY in keys:
        saved = [int(flag) for flag in store[ROUTES_KEY]]
        current = _flags(optimizer)
        if saved != current:
            paths = map(variable_path, optimizer._trainable_variables)
            differing = [path for path, a, b in zip(paths, saved, current) if a != b]
            raise ValueError(
                "Cannot load this optimizer state: it was saved with other "
                f"routes for {len(differing) or 'some'} variables "
                f"{differing[:5]}. Build the optimizer with the routing it was "
                "saved with (the same model, `attach(model)`, `exclude_layers`)."
            )
    return {key: store[key] for key in keys if key not in (ROUTES_KEY, CLASS_KEY)}


def _flags(optimizer):
    return [int(state.route.view is not None) for state in optimizer._states]


def _class_name(optimizer):
    """The name of the layout of `optimizer`'s state."""
    name = type(optimizer).__name__
    return f"{name}(hyperball=True)" if optimizer.hyperball else name
