import math
import numbers
import weakref

import keras
from keras import ops

from keras_muon import distributed
from keras_muon import routing
from keras_muon.arguments import boolean
from keras_muon.arguments import number
from keras_muon.distributed import orthogonalize
from keras_muon.newton_schulz import coefficient_schedule
from keras_muon.qk_clip import QKClip
from keras_muon.scaling import SCALES
from keras_muon.scaling import update_scale
from keras_muon.weight_decay import decayed

_NS_DTYPES = ("float32", "bfloat16", "float16")
# Saved beside the optimizer's variables: 1 per Muon variable, 0 per AdamW
# one; and the name of the class, whose state layout it is.
_ROUTES_KEY = "routes"
_CLASS_KEY = "class"


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
    `NorMuon` and `AdaMuon` add one step after msign.
    AdamW variables use bias-corrected AdamW with its own betas, learning
    rate `lr·adam_lr_ratio` and decoupled weight decay `adam_weight_decay`.

    Under `model.fit` the optimizer finds the model's layers by itself. In
    a custom training loop, call `attach(model)` before the first update.
    Otherwise, unless the model is a local variable of a calling function,
    variables are routed without their layer (a 2-D `kernel` as a `Dense`
    kernel, everything else to AdamW), and the table says so.

    The state is one momentum per Muon variable and two moments per AdamW
    variable, of the variable's dtype (float32 for 16-bit variables, whose
    new values are computed in float32 and rounded once).

    Each step, all Muon blocks of one shape (or its transpose) go through
    one batched Newton–Schulz iteration (`newton_schulz`), whatever
    variables, heads, gates or groups they come from. Distributed, each
    momentum has its variable's layout (`keras.distribution`), and under
    `tf.distribute.MirroredStrategy` each replica runs the batched update
    on its own copy of the variables. Under data parallelism each device
    orthogonalizes its share of the blocks and the devices exchange the
    results (`split_newton_schulz`).

    Non-finite gradients propagate as in AdamW, except that one NaN or inf
    in a Muon matrix's gradient makes that whole matrix NaN (msign mixes
    all its entries). `LossScaleOptimizer`, used automatically with
    `mixed_float16`, skips such steps.

    Args:
        learning_rate: A float, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or a
            callable that takes no arguments and returns the value to use.
            With `scale="moonlight"`, Muon's update has the RMS of an
            AdamW update, so AdamW's learning rate is a safe start; Muon
            stays stable at larger ones. Defaults to `0.003`.
        momentum: Float in [0, 1), the momentum of Muon. Defaults to `0.95`.
        nesterov: Boolean, whether Muon uses Nesterov momentum. Defaults to
            `True`.
        weight_decay: Float >= 0, decoupled weight decay of Muon variables,
            multiplied by the learning rate. Defaults to `0.1`.
        scale: How the orthogonalized update is scaled per `(d_in, d_out)`
            block: `"moonlight"` (`rms_rate·sqrt(max(d_in, d_out))`,
            AdamW-like update size), `"jordan"` (`sqrt(max(1, d_out/d_in))`),
            `"mup"` (`sqrt(d_out/d_in)`) or `"naive"` (1). The last three
            need a learning rate about `0.2·sqrt(d)` times AdamW's. Defaults
            to `"moonlight"`.
        rms_rate: Float > 0, the update RMS targeted by the `"moonlight"`
            scale (the only one that uses it). `None` means a factor of 1,
            as in `keras.optimizers.Muon`. Defaults to `0.2`.
        ns_steps: Integer >= 1, number of Newton–Schulz steps. Defaults to
            `5`.
        ns_coefficients: The `(a, b, c)` of each Newton–Schulz step:
            `"polar_express"`, `"jordan"`, `"you"`, or a sequence of
            triples (the last one repeats up to `ns_steps`). Defaults to
            `"polar_express"`.
        ns_dtype: Dtype of the Newton–Schulz iteration: `None` (float32),
            `"bfloat16"` (for accelerators) or `"float16"`. Normalisation is
            always float32. 16-bit iterations always use the plain
            iteration, never the Gram one.
        per_head: Boolean. If `True`, attention projections (`EinsumDense`
            kernels with a `(heads, head_dim)` side) are orthogonalized head
            by head. Defaults to `False`.
        exclude_layers: A regular expression or list of them; variables
            whose path matches one are optimized by AdamW.
        adam_beta_1: Float in [0, 1), AdamW's first-moment decay. Defaults
            to `0.9`.
        adam_beta_2: Float in [0, 1), AdamW's second-moment decay. Defaults
            to `0.999`.
        epsilon: Float > 0, AdamW's epsilon. Defaults to `1e-7`.
        adam_weight_decay: Float >= 0, decoupled weight decay of AdamW
            variables. Defaults to `0.004`.
        adam_lr_ratio: Float >= 0, AdamW's learning rate as a multiple of
            `learning_rate`. Defaults to `1.0`.
        cautious_weight_decay: Boolean. If `True`, weight decay applies
            only to the entries whose update has the sign of the weight
            (Chen et al., 2025), on Muon's and AdamW's side alike.
            Defaults to `False`.
        qk_clip_threshold: None, or a float `τ > 0`: QK-Clip (Kimi K2's
            MuonClip). Each training step records every attention head's
            largest pre-softmax logit `S_h`; after the update, a head with
            `S_h > τ` has its query and key projections (kernel and bias)
            multiplied by `γ^α` and `γ^(1−α)`, `γ = τ/S_h`, so that the
            step's inputs would give logits of at most `τ`. Applies to the
            attention layers with a rule (`register_attention_rule`):
            `MultiHeadAttention`, `GroupQueryAttention` and keras-hub's
            Llama, Mistral, Mixtral, Qwen, Gemma and GPT-2 attention. Use
            `summary()` to see them, `max_logits()` and `clipped_heads()`
            or the `QKClipMonitor` callback to watch them. Defaults to
            `None` (off).
        qk_clip_alpha: Float in [0, 1], the share of the clip taken by the
            query projection. Defaults to `0.5`.
        split_newton_schulz: Boolean. Under data parallelism
            (`keras.distribution`, `tf.distribute.MirroredStrategy`, or
            torch's default process group when one is initialized), each
            device runs Newton–Schulz on `1/N` of the blocks and the
            devices all-gather the results, the same update as one device
            computes. On torch, every process of the default group must
            train a copy of the same model, as under
            `DistributedDataParallel`. `False` makes every device
            orthogonalize every block. Defaults to `True`.
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
        - [Chen et al., 2025](https://arxiv.org/abs/2510.12402)
          (cautious weight decay)
        - [Kimi Team, 2025](https://arxiv.org/abs/2507.20534) (QK-Clip)
    """

    def __init__(
        self,
        learning_rate=0.003,
        momentum=0.95,
        nesterov=True,
        weight_decay=0.1,
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
        cautious_weight_decay=False,
        qk_clip_threshold=None,
        qk_clip_alpha=0.5,
        split_newton_schulz=True,
        name=None,
        **kwargs,
    ):
        if isinstance(learning_rate, numbers.Real):
            learning_rate = number("learning_rate", learning_rate, minimum=0.0)
        weight_decay = number("weight_decay", weight_decay, minimum=0.0, optional=True)
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        self.momentum = number("momentum", momentum, minimum=0.0, below=1.0)
        self.nesterov = boolean("nesterov", nesterov)
        if scale not in SCALES:
            raise ValueError(
                f"`scale` must be one of {SCALES}. Received: scale={scale!r}"
            )
        self.scale = scale
        self.rms_rate = number("rms_rate", rms_rate, above=0.0, optional=True)
        if scale != "moonlight" and rms_rate != 0.2:
            raise ValueError(
                f"`rms_rate` is used only by scale='moonlight'. Received: "
                f"rms_rate={rms_rate!r} with scale={scale!r}"
            )
        self._ns_schedule = coefficient_schedule(ns_coefficients, ns_steps)
        self.ns_steps = len(self._ns_schedule)
        self.ns_coefficients = ns_coefficients
        if ns_dtype is not None and ns_dtype not in _NS_DTYPES:
            raise ValueError(
                f"`ns_dtype` must be None or one of {_NS_DTYPES}. "
                f"Received: ns_dtype={ns_dtype!r}"
            )
        self.ns_dtype = ns_dtype
        self.per_head = boolean("per_head", per_head)
        self._exclude_patterns = routing.compile_patterns(exclude_layers)
        self.exclude_layers = exclude_layers
        self.adam_beta_1 = number("adam_beta_1", adam_beta_1, minimum=0.0, below=1.0)
        self.adam_beta_2 = number("adam_beta_2", adam_beta_2, minimum=0.0, below=1.0)
        self.epsilon = number("epsilon", epsilon, above=0.0)
        self.adam_weight_decay = number(
            "adam_weight_decay", adam_weight_decay, minimum=0.0, optional=True
        )
        self.adam_lr_ratio = number("adam_lr_ratio", adam_lr_ratio, minimum=0.0)
        self.cautious_weight_decay = boolean("cautious_weight_decay", cautious_weight_decay)
        self.qk_clip_threshold = number(
            "qk_clip_threshold", qk_clip_threshold, above=0.0, optional=True
        )
        self.qk_clip_alpha = number("qk_clip_alpha", qk_clip_alpha, minimum=0.0, maximum=1.0)
        self.split_newton_schulz = boolean("split_newton_schulz", split_newton_schulz)
        if qk_clip_threshold is not None and self.gradient_accumulation_steps:
            raise ValueError(
                "`qk_clip_threshold` does not support `gradient_accumulation_steps`: "
                "the clip needs the largest logit over all accumulated batches."
            )
        self._attached_model = None
        self._qk_clip = None

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
        model = self._attached_model() if self._attached_model else None
        if model is None:
            model = routing.find_model(self, var_list)
        distributed.reject_fsdp_parameters(model)
        probes = []
        if self.qk_clip_threshold is not None:
            self._qk_clip = _qk_clip(model, self.qk_clip_threshold, self.qk_clip_alpha)
            probes = self._qk_clip.probes
            var_list = _with_probes(var_list, probes, model)
        super().build(var_list)
        routes = routing.route_variables(
            var_list, model, self.per_head, self._exclude_patterns
        )
        self._routes = []
        self._scales = []
        self._momentums = []
        self._velocities = []
        self._block_states = []
        for variable, route in zip(var_list, routes):
            momentum = velocity = block_state = None
            if self._overwrite_variable_with_gradient(variable):
                route = routing.Route(None, "overwritten with its gradient")
            elif _contains(probes, variable):
                route = routing.Route(None, "QK-Clip logit probe, never updated")
            else:
                momentum = self._add_state(variable, "momentum")
                if route.view is None:
                    velocity = self._add_state(variable, "velocity")
                else:
                    block_state = self._add_block_state(variable, route.view)
            self._routes.append(route)
            self._momentums.append(momentum)
            self._velocities.append(velocity)
            self._block_states.append(block_state)
            self._scales.append(None if route.view is None else self._block_scale(route.view))
        if self._qk_clip is not None:
            self._qk_clip.build(self)

    def _block_scale(self, view):
        """The factor `s` of the update of `view`'s blocks."""
        return update_scale(self.scale, view.d_in, view.d_out, self.rms_rate)

    def _add_block_state(self, variable, view):
        """State a variant keeps per Muon variable besides its momentum:
        none for Muon."""
        return None

    def _orthogonalization_input(self, blocks):
        """What Newton–Schulz orthogonalizes, from the float32 directions of
        one block shape stacked `(blocks, rows, cols)`, rows <= cols: the
        directions themselves for Muon."""
        return blocks

    def _normalized(self, index, orthogonal_blocks):
        """The orthogonalized blocks `(num_blocks, d_in, d_out)` of variable
        `index`, as the update to scale by `s`: as they are for Muon."""
        return orthogonal_blocks

    def _add_state(self, variable, name):
        if variable.dtype not in ("float16", "bfloat16"):
            return self.add_variable_from_reference(variable, name)
        # 16-bit moments lose the update: float16 squares of small gradients
        # underflow, bfloat16 rounds adam_beta_2=0.999 to 1. Keep float32.
        return self._add_float32_state(
            variable, name, variable.shape, getattr(variable, "_layout", None)
        )

    def _add_float32_state(self, variable, name, shape, layout=None):
        """A zero float32 state `name` of `shape`, named after `variable`."""
        return self.add_variable(
            shape=shape,
            dtype="float32",
            name=f"{routing.variable_path(variable).replace('/', '_')}_{name}",
            layout=layout,
        )

    def apply(self, grads, trainable_variables=None):
        # Sum sparse gradients per row first, so that clipping, accumulation
        # and the moments see the same gradient on every backend.
        grads = list(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        variables = trainable_variables or self._trainable_variables
        if len(grads) == len(variables):
            grads = [_dense(g, v.shape) for g, v in zip(grads, variables)]
        if self.qk_clip_threshold is not None and (self.built or trainable_variables):
            built_now = not self.built
            if built_now:
                self.build(variables)
            # A TensorFlow trace that built the optimizer ran the model
            # before the probes existed; it only initializes the variables.
            first_trace = built_now and _in_tf_function()
            grads, trainable_variables = self._qk_clip.take_logits(
                grads, variables, self, required=not first_trace
            )
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        self._update([gradient], [variable], learning_rate)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if keras.backend.backend() == "torch":
            from keras_muon import torch_update  # imports torch

            if torch_update.applies_to(type(self), Muon):
                torch_update.update(self, grads, trainable_variables, learning_rate)
                return
        strategy = distributed.tf_strategy()
        if strategy is None:
            self._update(grads, trainable_variables, learning_rate)
        elif distributed.is_mirrored(strategy):
            distributed.mirrored_update(self, grads, trainable_variables, learning_rate)
        else:
            # Other strategies place variables on devices of their own:
            # update each variable where it lives, one `update_step` at a
            # time, as Keras does.
            super()._backend_update_step(grads, trainable_variables, learning_rate)

    def _update(self, grads, variables, learning_rate):
        """Updates AdamW variables one by one, and Muon variables with one
        batched Newton–Schulz iteration per block shape. (On torch,
        `torch_update.update` computes the same with multi-tensor
        operations.)"""
        groups = self._update_momentums(grads, variables, learning_rate)
        orthogonal = [
            orthogonalize(blocks, self._ns_schedule, self.ns_dtype, self.split_newton_schulz)
            for _, blocks in groups
        ]
        self._update_muon_variables(groups, orthogonal)

    def _update_momentums(self, grads, variables, learning_rate):
        """Updates the AdamW variables and the Muon momentums. Returns the
        Muon variables grouped by block shape (or its transpose): per group,
        its `(index, variable, lr)` and its stacked blocks, as
        `_orthogonalization_input` gives them to Newton–Schulz."""
        groups = {}
        for gradient, variable in zip(grads, variables):
            index = self._get_variable_index(variable)
            # The state's dtype: the variable's, or float32 for 16-bit ones.
            dtype = self._momentums[index].dtype
            gradient = ops.cast(gradient, dtype)
            lr = ops.cast(learning_rate, dtype)
            view = self._routes[index].view
            if view is None:
                adam_lr = lr * self.adam_lr_ratio
                step = self._adamw_step(index, gradient, adam_lr)
                weights = self._decayed(
                    index, ops.cast(variable, dtype), step, adam_lr, self.adam_weight_decay
                )
                self.assign(variable, ops.cast(ops.subtract(weights, step), variable.dtype))
            else:
                blocks = view.to_wide_blocks(self._muon_direction(index, gradient))
                groups.setdefault(blocks.shape[1:], []).append((index, variable, lr, blocks))
        return [
            (
                [entry[:3] for entry in group],
                self._orthogonalization_input(_concatenated([entry[3] for entry in group])),
            )
            for group in groups.values()
        ]

    def _update_muon_variables(self, groups, orthogonal):
        """Updates the Muon variables of `groups` (from `_update_momentums`)
        with their orthogonalized blocks, then clips attention logits."""
        for (entries, _), blocks in zip(groups, orthogonal):
            start = 0
            for index, variable, lr in entries:
                end = start + self._routes[index].view.num_blocks
                new_value = self._muon_update(index, variable, blocks[start:end], lr)
                self.assign(variable, ops.cast(new_value, variable.dtype))
                start = end
        if self._qk_clip is not None:
            self._qk_clip.clip(self)

    def _muon_direction(self, index, gradient):
        """Updates the momentum; returns the direction to orthogonalize."""
        momentum = self._momentums[index]
        beta = self.momentum
        new_momentum = ops.add(ops.multiply(momentum, beta), gradient)
        self.assign(momentum, new_momentum)
        if self.nesterov:
            return ops.add(ops.multiply(new_momentum, beta), gradient)
        return new_momentum

    def _muon_update(self, index, variable, orthogonal_blocks, lr):
        """The new value of a Muon variable, from its orthogonalized blocks:
        `W·(1 − lr·λ) − (lr·s)·O`, with the scalars multiplied first."""
        view = self._routes[index].view
        if view.d_in > view.d_out:
            orthogonal_blocks = ops.swapaxes(orthogonal_blocks, -1, -2)
        blocks = self._normalized(index, orthogonal_blocks)
        update = view.from_blocks(ops.cast(blocks, lr.dtype))
        weights = self._decayed(
            index, ops.cast(variable, lr.dtype), update, lr, self.weight_decay
        )
        return ops.subtract(weights, ops.multiply(update, lr * self._scales[index]))

    def _decayed(self, index, weights, update, lr, rate):
        """`weights` after the decoupled weight decay of variable `index`
        at `rate`, before `update` is subtracted."""
        decay = self._decay_rate(index, rate)
        if not decay:
            return weights
        return decayed(weights, update, lr * decay, self.cautious_weight_decay)

    def _adamw_step(self, index, gradient, lr):
        """AdamW's step for variable `index`, without weight decay."""
        m = self._momentums[index]
        v = self._velocities[index]
        step = ops.cast(self.iterations + 1, m.dtype)
        beta_1 = ops.cast(self.adam_beta_1, m.dtype)
        beta_2 = ops.cast(self.adam_beta_2, m.dtype)
        alpha = lr * ops.sqrt(1 - ops.power(beta_2, step)) / (1 - ops.power(beta_1, step))
        new_m = ops.add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.adam_beta_1))
        new_v = ops.add(
            v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.adam_beta_2)
        )
        self.assign(m, new_m)
        self.assign(v, new_v)
        return ops.divide(ops.multiply(new_m, alpha), ops.add(ops.sqrt(new_v), self.epsilon))

    def _decay_rate(self, index, rate):
        if not rate or not self._use_weight_decay(self._trainable_variables[index]):
            return 0.0
        return rate

    def _apply_weight_decay(self, variables):
        # Weight decay is applied in `update_step`, with each route's rate.
        pass

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.built:
            store[_ROUTES_KEY] = ops.convert_to_tensor(self._route_flags(), "int8")
            store[_CLASS_KEY] = ops.convert_to_tensor(list(type(self).__name__.encode()), "int32")

    def load_own_variables(self, store):
        keys = list(store.keys())
        if _CLASS_KEY in keys:
            saved = bytes(int(c) for c in store[_CLASS_KEY]).decode()
            if saved != type(self).__name__:
                raise ValueError(
                    f"Cannot load this optimizer state into {type(self).__name__}: "
                    f"it was saved by {saved}, whose state is laid out "
                    f"differently. Use {saved} to resume."
                )
        if self.built and _ROUTES_KEY in keys:
            saved = [int(flag) for flag in store[_ROUTES_KEY]]
            current = self._route_flags()
            if saved != current:
                # The state layout follows the routes (AdamW variables have
                # a velocity): loading across routes would mix moments up.
                differing = [
                    routing.variable_path(v)
                    for v, a, b in zip(self._trainable_variables, saved, current)
                    if a != b
                ]
                raise ValueError(
                    "Cannot load this optimizer state: it was saved with "
                    f"other routes for {len(differing) or 'some'} variables "
                    f"{differing[:5]}. Build the optimizer with the routing "
                    "it was saved with (the same model, `attach(model)`, "
                    "`exclude_layers`)."
                )
        own = (_ROUTES_KEY, _CLASS_KEY)
        super().load_own_variables({key: store[key] for key in keys if key not in own})

    def _route_flags(self):
        return [int(route.view is not None) for route in self._routes]

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
        probes = self._qk_clip.probes if self._qk_clip else []
        for variable, route, scale in zip(
            self._trainable_variables, self._routes, self._scales
        ):
            if _contains(probes, variable):
                continue
            view = route.view
            rows.append(
                {
                    "path": routing.variable_path(variable),
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
        if self._qk_clip is not None:
            message += "\n\n" + self._qk_clip.summary()
        (print_fn or print)(message)

    def max_logits(self):
        """QK-Clip's record of the last training step: the largest
        attention logit of each query head, before the clip, as
        `{layer path: numpy array (query_heads,)}`."""
        return self._built_qk_clip().max_logits()

    def clipped_heads(self):
        """QK-Clip: the number of heads clipped in the last step."""
        return self._built_qk_clip().clipped_count()

    def _built_qk_clip(self):
        if self.qk_clip_threshold is None or not self.built:
            raise ValueError(
                "QK-Clip statistics exist once an optimizer created with "
                "`qk_clip_threshold` is built."
            )
        return self._qk_clip

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
                "cautious_weight_decay": self.cautious_weight_decay,
                "qk_clip_threshold": self.qk_clip_threshold,
                "qk_clip_alpha": self.qk_clip_alpha,
                "split_newton_schulz": self.split_newton_schulz,
            }
        )
        return config


def _qk_clip(model, threshold, alpha):
    strategy = distributed.tf_strategy()
    if strategy is not None and not distributed.is_mirrored(strategy):
        raise ValueError(
            f"`qk_clip_threshold` supports tf.distribute.MirroredStrategy, not "
            f"{type(strategy).__name__}."
        )
    return QKClip(model, threshold, alpha)


def _contains(variables, variable):
    return any(v is variable for v in variables)


def _with_probes(var_list, probes, model):
    """`var_list` and the QK-Clip probes, whose gradients carry the logits,
    in the model's order if that is all of the model's trainable variables
    (JAX's trainer pairs them with the optimizer's by position)."""
    var_list = [*var_list, *(p for p in probes if not _contains(var_list, p))]
    ordered = model.trainable_variables
    if len(ordered) == len(var_list) and all(_contains(var_list, v) for v in ordered):
        return ordered
    return var_list


def _in_tf_function():
    """Whether this runs while TensorFlow traces a function. A function
    that creates variables in its first trace (an optimizer built by its
    first `apply`) is traced again before it runs."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.inside_function()


def _concatenated(blocks):
    return blocks[0] if len(blocks) == 1 else ops.concatenate(blocks)


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
