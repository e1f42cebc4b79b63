import functools
import numbers

import keras
from keras import ops

from keras_muon import checkpoint
from keras_muon import report
from keras_muon.arguments import Default
from keras_muon.arguments import boolean
from keras_muon.arguments import document
from keras_muon.arguments import number
from keras_muon.arguments import optional_integer
from keras_muon.arguments import optional_number
from keras_muon.backends import distributed
from keras_muon.qk_clip.clip import QKClip
from keras_muon.routing import route
from keras_muon.routing.views import Route
from keras_muon.update import batching
from keras_muon.update import momentum_storage
from keras_muon.update import parts
from keras_muon.update import rule
from keras_muon.update.momentum_storage import checked_momentum_dtype
from keras_muon.update.newton_schulz import checked_dtype
from keras_muon.update.newton_schulz import coefficient_schedule
from keras_muon.update.state import Entry
from keras_muon.update.state import VariableState
from keras_muon.update.state import add_moment
from keras_muon.update.state import add_muon_momentum
from keras_muon.update.state import add_radius


def _torch_twin(phase):
    """On the torch backend, `phase` runs as its multi-tensor twin: the
    function of the same name in `backends/torch_foreach.py`. A subclass
    that overrides the phase runs its override on every backend."""
    name = phase.__name__.lstrip("_")

    @functools.wraps(phase)
    def phase_or_twin(self, *args):
        if keras.backend.backend() == "torch":
            from keras_muon.backends import torch_foreach  # imports torch

            return getattr(torch_foreach, name)(self, *args)
        return phase(self, *args)

    return phase_or_twin


@keras.saving.register_keras_serializable(package="keras_muon")
@document
class Muon(keras.optimizers.Optimizer):
    """Muon for the hidden weight matrices of a model, AdamW for the rest.

    Each variable is routed by the type of the layer that owns it: the
    kernels of `Dense`, `EinsumDense` (so attention), convolution and
    recurrent layers go to Muon, read as `(d_in, d_out)` blocks in the
    layer's own orientation; embeddings, output heads, biases, norms and
    depthwise kernels go to AdamW (`summary()`; docs/routing.md). For a
    Muon variable `W` with gradient `G`, block by block:

    ```
    M ← β·M + G
    O = msign(β·M + G)            (msign(M) if nesterov=False)
    W ← W − lr·(s·O + λ·W)
    ```

    msign is the orthogonal polar factor, by Newton–Schulz iteration, and
    `s` depends on `scale` and `(d_in, d_out)`. AdamW variables get AdamW
    at `lr·adam_lr_ratio` with `adam_weight_decay`. In a custom training
    loop, call `attach(model)` first (`fit` finds the model).

    A variant subclasses `Muon` and overrides hooks (NorMuon, two):
    `_block_scale(view)`, the factor `s` of a variable's blocks;
    `_add_variant_state(variable, view)`, its state besides the momentum
    (`update.state.add_float32_state`); `_orthogonalization_input(blocks)`,
    what msign is applied to, from the directions `N` as wide blocks
    (AdaMuon: `sign(N)`); `_normalized(entry, blocks)`, the step after
    msign on a variable's blocks `O`, its state `entry.state`. Overriding a
    phase of `_update` changes the algorithm on every backend.

    Args:
        {{muon_arguments}}

    References:
        - [Jordan et al., 2024](https://kellerjordan.github.io/posts/muon/)
        - [Liu et al., 2025](https://arxiv.org/abs/2502.16982) (Moonlight)
        - [Amsel et al., 2025](https://arxiv.org/abs/2505.16932) (Polar Express)
        - [Chen et al., 2025](https://arxiv.org/abs/2510.12402) (cautious weight decay)
        - [Kimi Team, 2025](https://arxiv.org/abs/2507.20534) (QK-Clip)
        - [Wen et al., 2026](https://arxiv.org/abs/2606.16899) (Hyperball)
    """

    def __init__(
        self,
        learning_rate=0.003,
        momentum=0.95,
        nesterov=True,
        weight_decay=Default(0.1),
        scale="moonlight",
        rms_rate=rule.DEFAULT_RMS_RATE,
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
        ns_bucket_bytes=None,
        momentum_dtype="float32",
        lora="muon",
        hyperball=False,
        name=None,
        **kwargs,
    ):
        if isinstance(learning_rate, numbers.Real):
            learning_rate = number("learning_rate", learning_rate, minimum=0.0)
        weight_decay, hyperball = rule.checked_weight_decay(weight_decay, hyperball)
        super().__init__(learning_rate, weight_decay=weight_decay, name=name, **kwargs)
        self.momentum = number("momentum", momentum, minimum=0.0, below=1.0)
        self.nesterov = boolean("nesterov", nesterov)
        self.rms_rate = optional_number("rms_rate", rms_rate, above=0.0)
        self.scale = rule.checked_scale(scale, rms_rate)
        self._ns_schedule = coefficient_schedule(ns_coefficients, ns_steps)
        self.ns_steps = len(self._ns_schedule)
        self.ns_coefficients = ns_coefficients
        self.ns_dtype = checked_dtype(ns_dtype)
        self.per_head = boolean("per_head", per_head)
        self._exclude_patterns = route.compile_patterns(exclude_layers)
        self.exclude_layers = exclude_layers
        self.adam_beta_1 = number("adam_beta_1", adam_beta_1, minimum=0.0, below=1.0)
        self.adam_beta_2 = number("adam_beta_2", adam_beta_2, minimum=0.0, below=1.0)
        self.epsilon = number("epsilon", epsilon, above=0.0)
        self.adam_weight_decay = optional_number(
            "adam_weight_decay", adam_weight_decay, minimum=0.0
        )
        self.adam_lr_ratio = number("adam_lr_ratio", adam_lr_ratio, minimum=0.0)
        self.cautious_weight_decay = boolean("cautious_weight_decay", cautious_weight_decay)
        self.qk_clip_threshold = optional_number("qk_clip_threshold", qk_clip_threshold, above=0.0)
        self.qk_clip_alpha = number("qk_clip_alpha", qk_clip_alpha, minimum=0.0, maximum=1.0)
        self._qk_clip = QKClip.for_optimizer(self)  # None without a threshold
        self.split_newton_schulz = boolean("split_newton_schulz", split_newton_schulz)
        self.ns_bucket_bytes = optional_integer("ns_bucket_bytes", ns_bucket_bytes)
        self.momentum_dtype = checked_momentum_dtype(momentum_dtype)
        self.lora = route.checked_lora(lora)
        self.hyperball = hyperball
        self._attached_model = None
        self._state_to_restore = None  # loaded before the optimizer was built

    def attach(self, model):
        """Names the model to train, in a custom loop (`fit` finds it)."""
        self._attached_model = route.attached(self, model)

    def build(self, var_list):
        if self.built:
            return
        model = route.find_model(self, var_list)
        distributed.reject_fsdp_parameters(model)
        if self._qk_clip is not None:
            var_list = self._qk_clip.install(model, var_list)
        super().build(var_list)
        routes = route.route_variables(
            var_list, model, self.per_head, self._exclude_patterns, self.lora
        )
        batching.check_bucket_bytes(self.ns_bucket_bytes, var_list, [r.view for r in routes])
        self._states = [self._add_state(v, r) for v, r in zip(var_list, routes)]
        if self._qk_clip is not None:
            self._qk_clip.build(self)
        checkpoint.add_layout_record(self)
        checkpoint.restore_on_build(self)

    def _add_state(self, variable, route):
        """The `VariableState` of `variable` on `route`, its state created."""
        if self._overwrite_variable_with_gradient(variable):
            return VariableState(Route(None, "overwritten with its gradient"))
        if self._qk_clip is not None and self._qk_clip.is_probe(variable):
            return VariableState(Route(None, "QK-Clip logit probe, never updated"))
        decays = self._use_weight_decay(variable)
        if route.view is None:
            momentum, velocity = (add_moment(self, variable, n) for n in ("momentum", "velocity"))
            return VariableState(route, momentum, velocity, decays=decays)
        momentum, scales = add_muon_momentum(self, variable, self.momentum_dtype)
        state, scale = parts.variant_state_and_scale(self, variable, route)
        radius = add_radius(self, variable, route.view) if self.hyperball else None
        return VariableState(route, momentum, None, state, scale, decays, radius, scales)

    # The variant hooks (see the class docstring): Muon's do nothing.

    def _block_scale(self, view):
        return rule.update_scale(self.scale, view.d_in, view.d_out, self.rms_rate)

    def _add_variant_state(self, variable, view):
        return None

    def _orthogonalization_input(self, blocks):
        return blocks

    def _normalized(self, entry, blocks):
        return blocks

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        trainable_variables = None if trainable_variables is None else list(trainable_variables)
        variables = trainable_variables or self._trainable_variables
        if len(grads) == len(variables):
            # Sparse rows summed first: clipping and moments alike everywhere.
            grads = [_densified(g, v.shape) for g, v in zip(grads, variables)]
        if self._qk_clip is not None and (self.built or trainable_variables):
            grads, trainable_variables = self._qk_clip.take_logits(self, grads, variables)
        return super().apply(grads, trainable_variables)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if distributed.tf_strategy() is None:
            return self._update(grads, trainable_variables, learning_rate)
        from keras_muon.backends import tf_distribute  # imports TensorFlow

        each = super()._backend_update_step  # `update_step` per variable
        tf_distribute.update(self, grads, trainable_variables, learning_rate, each)

    def update_step(self, gradient, variable, learning_rate):  # QK-Clip refuses its callers
        self._update([gradient], [variable], learning_rate)

    def _update(self, grads, variables, learning_rate):
        """One step of `variables`: the equations above, phase by phase."""
        adamw, muon = self._entries_by_route(grads, variables)
        self._adamw_update(adamw, learning_rate)
        splits, budget = distributed.split_counts(muon), self.ns_bucket_bytes
        buckets = batching.buckets(muon, distributed.placements(muon), budget, splits)
        for bucket in batching.one_after_another(buckets, adamw):  # ≤ ns_bucket_bytes/device
            batches = self._momentum_update(bucket)  # M ← β·M + G; N, by block shape
            orthogonal = [self._orthogonalize(batch) for batch in batches]  # O = msign(N)
            self._muon_update(batches, orthogonal, learning_rate)  # W ← W − lr·(s·O + λ·W)
        self._clip_attention()  # QK-Clip, if on

    def _entries_by_route(self, grads, variables):
        """The `Entry` of each variable: AdamW's, and Muon's."""
        adamw, muon = [], []
        for gradient, variable in zip(grads, variables):
            state = self._states[self._get_variable_index(variable)]
            (adamw if state.route.view is None else muon).append(Entry(variable, gradient, state))
        return adamw, muon

    @_torch_twin
    def _adamw_update(self, entries, learning_rate):
        """`W ← W − lr·(m̂/(sqrt(v̂) + ε) + λ·W)` per AdamW variable."""
        for variable, gradient, state in entries:
            dtype = state.momentum.dtype
            lr = ops.cast(learning_rate, dtype) * self.adam_lr_ratio
            gradient = ops.cast(gradient, dtype)
            m, v = rule.adamw_moments(
                state.momentum, state.velocity, gradient, self.adam_beta_1, self.adam_beta_2
            )
            self.assign(state.momentum, m)
            self.assign(state.velocity, v)
            t = ops.cast(self.iterations + 1, dtype)
            step = rule.adamw_step(m, v, lr, t, self.adam_beta_1, self.adam_beta_2, self.epsilon)
            weights = ops.cast(variable, dtype)
            weights = self._decayed(state, weights, step, lr, self.adam_weight_decay)
            self.assign(variable, ops.cast(ops.subtract(weights, step), variable.dtype))

    @_torch_twin
    def _momentum_update(self, entries):
        """`M ← β·M + G` per Muon variable; `N` in a `BlockBatch` per shape."""
        directions = []
        for _, gradient, state in entries:
            gradient = ops.cast(gradient, state.dtype)
            momentum, direction = rule.momentum_and_direction(
                momentum_storage.read(state), gradient, self.momentum, self.nesterov
            )
            for variable, value in momentum_storage.stored(state, momentum, after=direction):
                self.assign(variable, value)
            directions.append(state.route.view.to_wide_blocks(direction))
        return batching.stack_by_shape(entries, directions, distributed.placements(entries))

    def _orthogonalize(self, batch):
        """`O = msign(X)`, `X` the variant's input from `N`, among replicas."""
        x, split = self._orthogonalization_input(batch.blocks), self.split_newton_schulz
        return distributed.orthogonalize(
            x, self._ns_schedule, self.ns_dtype, split, batch.placement
        )

    @_torch_twin
    def _muon_update(self, batches, orthogonal, learning_rate):
        """`W ← W − lr·(s·O + λ·W)` per Muon variable, `O` as `_normalized`."""
        for entry, blocks in batching.by_variable(batches, orthogonal):  # a list per part
            variable, _, state = entry
            dtype, lr = state.dtype, ops.cast(learning_rate, state.dtype)
            blocks = [
                ops.cast(self._normalized(e, b), dtype) for e, b in parts.entries(entry, blocks)
            ]
            weights = ops.cast(variable, dtype)
            if state.radius is not None:  # normalized: the scale `s` drops out
                new_value, radius = parts.hyperball(state, weights, blocks, lr)
                self.assign(state.radius, radius)
            else:
                update, scale = parts.update(state, blocks)
                weights = self._decayed(state, weights, update, lr, self.weight_decay)
                new_value = rule.descended(weights, update, lr * scale)
            self.assign(variable, ops.cast(new_value, variable.dtype))

    def _clip_attention(self):
        if self._qk_clip is not None:
            self._qk_clip.clip(self)

    def _decayed(self, state, weights, update, lr, rate):
        if not (rate and state.decays):
            return weights
        return rule.decayed(weights, update, lr * rate, self.cautious_weight_decay)

    def _apply_weight_decay(self, variables):
        pass  # in `_update`, at each route's rate

    # By position as Keras does, with the routes and the class (checkpoint.py).
    save_own_variables = checkpoint.save
    load_own_variables = checkpoint.load

    def routing_table(self):
        """How each trainable variable is optimized, a dict per variable:
        `path`, `shape`, `route` (`"muon"` or `"adamw"`), `reason`; for Muon
        `matrix_shape` (`(d_in, d_out)`), `num_blocks`, `scale` (`s`; per
        part where parts differ), `parts` (a fused kernel's matrices)."""
        return report.routing_table(self)

    def summary(self, print_fn=None):
        """Prints `routing_table()` and QK-Clip's layers with `print_fn`."""
        (print_fn or print)(report.summary(self))

    def max_logits(self):
        """QK-Clip's record of the last step: `{layer path: each query
        head's largest attention logit before the clip}` (NumPy)."""
        return QKClip.of(self).max_logits()

    def clipped_heads(self):
        """QK-Clip: the number of heads clipped in the last step."""
        return QKClip.of(self).clipped_count()

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in _CONFIG})
        if not isinstance(self.ns_coefficients, str):
            config["ns_coefficients"] = [list(abc) for abc in self._ns_schedule]
        config["exclude_layers"] = [p.pattern for p in self._exclude_patterns]
        return config


# The arguments of `Muon.__init__` that Keras's optimizers do not have.
_CONFIG = (
    "momentum",
    "nesterov",
    "scale",
    "rms_rate",
    "ns_steps",
    "ns_coefficients",
    "ns_dtype",
    "per_head",
    "exclude_layers",
    "adam_beta_1",
    "adam_beta_2",
    "epsilon",
    "adam_weight_decay",
    "adam_lr_ratio",
    "cautious_weight_decay",
    "qk_clip_threshold",
    "qk_clip_alpha",
    "split_newton_schulz",
    "ns_bucket_bytes",
    "momentum_dtype",
    "lora",
    "hyperball",
)


def _densified(gradient, shape):
    """`gradient` as a dense tensor of `shape`.

    TensorFlow gives embedding lookups sparse gradients (`IndexedSlices`)
    whose rows can repeat. They are summed per row here, before any
    nonlinear moment update, so that all backends compute the same thing.
    """
    if hasattr(gradient, "indices") and hasattr(gradient, "dense_shape"):
        rows = ops.expand_dims(gradient.indices, -1)
        return ops.scatter(rows, gradient.values, shape)
    return gradient
