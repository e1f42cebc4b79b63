"""Names of variables: in the routing table, in the optimizer's state,
and the names that say what a variable is."""


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
