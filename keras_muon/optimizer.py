import math
import weakref

import keras
from keras import ops

from keras_muon import routing
from keras_muon.newton_schulz import coefficient_schedule
from keras_muon.newton_schulz import msign
from keras_muon.scaling import SCALES
from keras_muon.scaling import update_scale

_NS_DTYPES = ("float32", "bfloat16", "float16")


@keras.saving.register_keras_serializable(package="keras_muon")
class Muon(keras.optimizers.Optimizer):
    """Muon for the hidden weight matrices of a model, AdamW for the rest.

    Each variable is routed by the type of the layer that owns it (see
    `routing_table()`): the weight matrices of `Dense`, `EinsumDense` (and so
    attention), convolution and recurrent layers go to Muon, each read as
    one or more `(d_in, d_out)` matrices in the layer's own orientation.
    Embeddings, output heads (layers whose output is a model output),
    biases, normalization weights and depthwise kernels go to AdamW.

    For a Muon variable `W` with gradient `G`:

    ```
    M ← β·M + G
    O = msign(β·M + G)            (msign(M) if nesterov=False)
    W ← W − lr·(s·O + λ·W)
    ```

    where msign is the orthogonal polar factor computed by Newton–Schulz
    iteration and `s` depends on `scale` and the block's `(d_in, d_out)`.
    AdamW variables use bias-corrected AdamW with its own betas, learning
    rate `lr·adam_lr_ratio` and decoupled weight decay `adam_weight_decay`.

    Under `model.fit` the optimizer finds the model's layers by itself. In
    a custom training loop, call `attach(model)` before the first update;
    otherwise variables are routed without their layer (a 2-D `kernel` as a
    `Dense` kernel, everything else to AdamW), and the table says so.

    Non-finite gradients propagate as in AdamW, except that one NaN or inf
    in a Muon matrix's gradient makes that whole matrix NaN (msign mixes
    all its entries). `LossScaleOptimizer`, used automatically with
    `mixed_float16`, skips such steps.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or a
            callable that takes no arguments and returns the value to use.
            With `scale="moonlight"`, use the learning rate you would use
            with AdamW. Defaults to `0.001`.
        momentum: Float in [0, 1), the momentum of Muon. Defaults to `0.95`.
        nesterov: Boolean, whether Muon uses Nesterov momentum. Defaults to
            `True`.
        weight_decay: Float >= 0, decoupled weight decay of Muon variables,
            multiplied by the learning rate. Defaults to `0.004`.
        scale: How the orthogonalized update is scaled per `(d_in, d_out)`
            block: `"moonlight"` (`rms_rate·sqrt(max(d_in, d_out))`,
            AdamW-like update size), `"jordan"` (`sqrt(max(1, d_out/d_in))`),
            `"mup"` (`sqrt(d_out/d_in)`) or `"naive"` (1). The last three
            need a learning rate about `0.2·sqrt(d)` times AdamW's. Defaults
            to `"moonlight"`.
        rms_rate: Float > 0, the update RMS targeted by the `"moonlight"`
            scale. `None` means a factor of 1, as in
            `keras.optimizers.Muon`. Defaults to `0.2`.
        ns_steps: Integer >= 1, number of Newton–Schulz steps. Defaults to
            `5`.
        ns_coefficients: The `(a, b, c)` of each Newton–Schulz step:
            `"polar_express"`, `"jordan"`, `"you"`, or a sequence of
            triples (the last one repeats up to `ns_steps`). Defaults to
            `"polar_express"`.
        ns_dtype: Dtype of the Newton–Schulz iteration: `None` (float32),
            `"bfloat16"` (for accelerators) or `"float16"`. Normalisation is
            always float32 and the result is cast to the variable's dtype.
        per_head: Boolean. If `True`, attention projections (`EinsumDense`
            kernels with a `(heads, head_dim)` side) are orthogonalized head
            by head. Defaults to `False`.
        exclude_layers: A regular expression or list of them; variables
            whose path matches one are optimized by AdamW.
        adam_beta_1: Float in [0, 1), AdamW's first-moment decay. Defaults
            to `0.9`.
        adam_beta_2: Float in [0, 1), AdamW's second-moment decay. Defaults
            to `0.999`.
        epsilon: Float >= 0, AdamW's epsilon. Defaults to `1e-7`.
        adam_weight_decay: Float >= 0, decoupled weight decay of AdamW
            variables. Defaults to `0.004`.
        adam_lr_ratio: Float >= 0, AdamW's learning rate as a multiple of
            `learning_rate`. Defaults to `1.0`.
        name: String, the name of the optimizer and prefix of its variables.
        **kwargs: Arguments of every Keras optimizer: `clipnorm`,
            `clipvalue`, `global_clipnorm`, `use_ema`, `ema_momentum`,
            `ema_overwrite_frequency`, `loss_scale_factor`,
            `gradient_accumulation_steps`; see `keras.optimizers.Optimizer`.

    References:
        - [Jordan et al., 2024](https://kellerjordan.github.io/posts/muon/)
        - [Liu et al., 2025](https://arxiv.org/abs/2502.16982) (Moonlight)
        - [Amsel et al., 2025](https://arxiv.org/abs/2505.16932)
          (Polar Express)
    """

    def __init__(
        self,
        learning_rate=0.001,
        momentum=0.95,
        nesterov=True,
        weight_decay=0.004,
        scale="moonlight",
        rms_rate=0.2,
        ns_steps=5,
        ns_coefficients="polar_express",
        ns_dtype=None,
        per_head=False,
        exclude_layers=None,
        adam_beta_1=0.9,
        adam_beta_2=0.999,
        epsilon=1e-7,
        adam_weight_decay=0.004,
        adam_lr_ratio=1.0,
        name=None,
        **kwargs,
    ):
        _check_number("learning_rate", learning_rate, minimum=0.0, optional=True)
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        _check_number("momentum", momentum, minimum=0.0, below=1.0)
        _check_number("weight_decay", weight_decay, minimum=0.0, optional=True)
        _check_number("rms_rate", rms_rate, above=0.0, optional=True)
        _check_number("adam_beta_1", adam_beta_1, minimum=0.0, below=1.0)
        _check_number("adam_beta_2", adam_beta_2, minimum=0.0, below=1.0)
        _check_number("epsilon", epsilon, minimum=0.0)
        _check_number("adam_weight_decay", adam_weight_decay, minimum=0.0, optional=True)
        _check_number("adam_lr_ratio", adam_lr_ratio, minimum=0.0)
        for arg, value in (("nesterov", nesterov), ("per_head", per_head)):
            if not isinstance(value, bool):
                raise ValueError(
                    f"`{arg}` must be True or False. Received: {arg}={value!r}"
                )
        if scale not in SCALES:
            raise ValueError(
                f"`scale` must be one of {SCALES}. Received: scale={scale!r}"
            )
        if ns_dtype is not None and ns_dtype not in _NS_DTYPES:
            raise ValueError(
                f"`ns_dtype` must be None or one of {_NS_DTYPES}. "
                f"Received: ns_dtype={ns_dtype!r}"
            )
        self.momentum = momentum
        self.nesterov = nesterov
        self.scale = scale
        self.rms_rate = rms_rate
        self.ns_steps = ns_steps
        self.ns_coefficients = ns_coefficients
        self.ns_dtype = ns_dtype
        self.per_head = per_head
        self.exclude_layers = exclude_layers
        self.adam_beta_1 = adam_beta_1
        self.adam_beta_2 = adam_beta_2
        self.epsilon = epsilon
        self.adam_weight_decay = adam_weight_decay
        self.adam_lr_ratio = adam_lr_ratio
        self._ns_schedule = coefficient_schedule(ns_coefficients, ns_steps)
        self._exclude_patterns = routing.compile_patterns(exclude_layers)
        self._attached_model = None

    def attach(self, model):
        """Names the model whose variables this optimizer will train.

        Only needed in custom training loops, before the optimizer is built
        (by `build` or the first `apply`): `fit` finds the model itself.

        Args:
            model: The `keras.Model` (or layer) that owns the variables.
        """
        if not isinstance(model, keras.Layer):
            raise ValueError(
                f"`attach` expects a keras.Model or keras.Layer. Received: {model!r}"
            )
        if self.built:
            raise ValueError(
                "`attach` must be called before the optimizer is built: "
                "routing is decided at build time. Create a new optimizer."
            )
        self._attached_model = weakref.ref(model)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        model = self._attached_model() if self._attached_model else None
        if model is None:
            model = routing.find_model(self, var_list)
        routes = routing.route_variables(
            var_list, model, self.per_head, self._exclude_patterns
        )
        self._routes = []
        self._scales = []
        self._momentums = []
        self._velocities = []
        for variable, route in zip(var_list, routes):
            if self._overwrite_variable_with_gradient(variable):
                route = routing.Route(None, "overwritten with its gradient")
                momentum = velocity = None
            else:
                momentum = self.add_variable_from_reference(variable, "momentum")
                velocity = None
                if route.view is None:
                    velocity = self.add_variable_from_reference(variable, "velocity")
            self._routes.append(route)
            self._momentums.append(momentum)
            self._velocities.append(velocity)
            self._scales.append(
                None
                if route.view is None
                else update_scale(
                    self.scale, route.view.d_in, route.view.d_out, self.rms_rate
                )
            )

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        gradient = ops.cast(_dense(gradient, variable.shape), variable.dtype)
        lr = ops.cast(learning_rate, variable.dtype)
        if self._routes[index].view is None:
            self._adamw_update_step(index, gradient, variable, lr * self.adam_lr_ratio)
        else:
            self._muon_update_step(index, gradient, variable, lr)

    def _muon_update_step(self, index, gradient, variable, lr):
        momentum = self._momentums[index]
        beta = self.momentum
        new_momentum = ops.add(ops.multiply(momentum, beta), gradient)
        self.assign(momentum, new_momentum)
        if self.nesterov:
            direction = ops.add(ops.multiply(new_momentum, beta), gradient)
        else:
            direction = new_momentum
        view = self._routes[index].view
        orthogonal = view.from_blocks(
            msign(
                view.to_blocks(direction),
                steps=self.ns_steps,
                coefficients=self._ns_schedule,
                dtype=self.ns_dtype,
            )
        )
        update = ops.multiply(orthogonal, self._scales[index])
        decay = self._decay_rate(variable, self.weight_decay)
        if decay:
            update = ops.add(update, ops.multiply(variable, decay))
        self.assign_sub(variable, ops.multiply(update, lr))

    def _adamw_update_step(self, index, gradient, variable, lr):
        m = self._momentums[index]
        v = self._velocities[index]
        dtype = variable.dtype
        step = ops.cast(self.iterations + 1, dtype)
        beta_1 = ops.cast(self.adam_beta_1, dtype)
        beta_2 = ops.cast(self.adam_beta_2, dtype)
        alpha = lr * ops.sqrt(1 - ops.power(beta_2, step)) / (1 - ops.power(beta_1, step))
        new_m = ops.add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.adam_beta_1))
        new_v = ops.add(
            v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.adam_beta_2)
        )
        self.assign(m, new_m)
        self.assign(v, new_v)
        update = ops.divide(ops.multiply(new_m, alpha), ops.add(ops.sqrt(new_v), self.epsilon))
        decay = self._decay_rate(variable, self.adam_weight_decay)
        if decay:
            update = ops.add(update, ops.multiply(variable, lr * decay))
        self.assign_sub(variable, update)

    def _decay_rate(self, variable, rate):
        if not rate or not self._use_weight_decay(variable):
            return 0.0
        return rate

    def _apply_weight_decay(self, variables):
        # Weight decay is applied in `update_step`, with each route's rate.
        pass

    def routing_table(self):
        """How each trainable variable is optimized, one dict per variable.

        Keys: `path`, `shape`, `route` (`"muon"` or `"adamw"`), `reason`,
        `matrix_shape` (`(d_in, d_out)` of one block, None for AdamW),
        `num_blocks` and `scale` (the factor `s`, None for AdamW).
        """
        if not self.built:
            raise ValueError(
                "The optimizer is not built yet, so nothing is routed. It is "
                "built by `model.fit`, or call "
                "`optimizer.build(model.trainable_variables)`."
            )
        rows = []
        for variable, route, scale in zip(
            self._trainable_variables, self._routes, self._scales
        ):
            view = route.view
            rows.append(
                {
                    "path": variable.path,
                    "shape": tuple(variable.shape),
                    "route": route.name,
                    "reason": route.reason,
                    "matrix_shape": view.matrix_shape if view else None,
                    "num_blocks": view.num_blocks if view else None,
                    "scale": scale,
                }
            )
        return rows

    def summary(self, print_fn=None):
        """Prints `routing_table()` as a table.

        Args:
            print_fn: Function called with the whole text. Defaults to
                `print`.
        """
        rows = self.routing_table()
        header = ("Variable", "Shape", "Route", "Matrix × blocks", "Scale", "Reason")
        lines = [header]
        for row in rows:
            if row["route"] == "muon":
                d_in, d_out = row["matrix_shape"]
                matrix = f"{d_in}×{d_out}"
                if row["num_blocks"] > 1:
                    matrix += f" ×{row['num_blocks']}"
                scale = f"{row['scale']:.3g}"
            else:
                matrix = scale = ""
            shape = str(row["shape"])
            lines.append((row["path"], shape, row["route"], matrix, scale, row["reason"]))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = [
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in lines
        ]
        rule = "─" * len(max(text, key=len))
        counts = {}
        for row in rows:
            count, size = counts.get(row["route"], (0, 0))
            counts[row["route"]] = (count + 1, size + math.prod(row["shape"]))
        totals = ", ".join(
            f"{route}: {count} variables, {size:,} parameters"
            for route, (count, size) in sorted(counts.items(), reverse=True)
        )
        message = "\n".join(
            [f'Optimizer "{self.name}" routing', rule, text[0], rule, *text[1:], rule, totals]
        )
        (print_fn or print)(message)

    def get_config(self):
        config = super().get_config()
        coefficients = self.ns_coefficients
        if not isinstance(coefficients, str):
            coefficients = [list(abc) for abc in self._ns_schedule]
        config.update(
            {
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "scale": self.scale,
                "rms_rate": self.rms_rate,
                "ns_steps": self.ns_steps,
                "ns_coefficients": coefficients,
                "ns_dtype": self.ns_dtype,
                "per_head": self.per_head,
                "exclude_layers": [p.pattern for p in self._exclude_patterns],
                "adam_beta_1": self.adam_beta_1,
                "adam_beta_2": self.adam_beta_2,
                "epsilon": self.epsilon,
                "adam_weight_decay": self.adam_weight_decay,
                "adam_lr_ratio": self.adam_lr_ratio,
            }
        )
        return config


def _dense(gradient, shape):
    """`gradient` as a dense tensor of `shape`.

    TensorFlow gives embedding lookups sparse gradients (`IndexedSlices`)
    whose rows can repeat. They are summed per row here, before any
    nonlinear moment update, so that all backends compute the same thing.
    """
    if hasattr(gradient, "indices") and hasattr(gradient, "dense_shape"):
        rows = ops.expand_dims(gradient.indices, -1)
        return ops.scatter(rows, gradient.values, shape)
    return gradient


def _check_number(arg, value, minimum=None, below=None, above=None, optional=False):
    """Raises a ValueError naming `arg` unless `value` is in the bounds."""
    if (value is None and optional) or (arg == "learning_rate" and callable(value)):
        return
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum}")
    if above is not None:
        bounds.append(f"> {above}")
    if below is not None:
        bounds.append(f"< {below}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (
        is_number
        and math.isfinite(value)
        and (minimum is None or value >= minimum)
        and (above is None or value > above)
        and (below is None or value < below)
    ):
        allowed = "a finite number " + " and ".join(bounds)
        if optional:
            allowed += ", or None"
        raise ValueError(f"`{arg}` must be {allowed}. Received: {arg}={value!r}")
