"""Names of variables, in the routing table and in the optimizer's state."""


def variable_path(variable):
    """The path of a Keras variable, or the name of a backend variable
    (a raw `tf.Variable`), which has no path."""
    return getattr(variable, "path", None) or variable.name


def state_name(path, name):
    """The name of the optimizer's state `name` for the variable or layer
    at `path`, as Keras names state made from a reference variable."""
    return f"{path.replace('/', '_')}_{name}"
