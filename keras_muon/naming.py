"""Names of variables: in the routing table, in the optimizer's state,
and the names that say what a variable is."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class VariableSection:
    """A section of a variable that holds several matrices (a fused `[q |
    k | v | mlp_in]` kernel), named as a variable so that the state made
    for it is named after its part: `path` is the variable's, `_part`
    added. `_layout` is the variable's under `keras.distribution` where the
    sectioned axis is not split over devices, else None (replicated)."""

    path: str
    name: str
    shape: tuple
    dtype: str
    _layout: object = None

    @classmethod
    def of(cls, variable, part, shape, axis):
        layout = getattr(variable, "_layout", None)
        if layout is not None and layout.axes[axis] is not None:
            layout = None
        path = f"{variable_path(variable)}_{part}"
        return cls(path, variable.name, tuple(shape), variable.dtype, layout)


def variable_path(variable):
    """The path of a Keras variable, or the name of a backend variable
    (a raw `tf.Variable`), which has no path."""
    return getattr(variable, "path", None) or variable.name


def state_name(path, name):
    """The name of the optimizer's state `name` for the variable or layer
    at `path`, as Keras names state made from a reference variable."""
    return f"{path.replace('/', '_')}_{name}"


def is_lora_factor(variable):
    """Whether `variable` is a factor of the low-rank update that
    `enable_lora` adds to a frozen `Dense` or `EinsumDense` kernel."""
    return variable.name in ("lora_kernel_a", "lora_kernel_b")


def lora_rank(variable):
    """The rank of a LoRA factor: the last axis of `lora_kernel_a`, the
    first of `lora_kernel_b` (an `EinsumDense` factor has other axes too,
    which may be shorter)."""
    return variable.shape[-1] if variable.name == "lora_kernel_a" else variable.shape[0]
