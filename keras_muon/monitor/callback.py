"""`MuonMonitor`: the numbers of a Muon run in `fit`'s logs, the progress
bar and TensorBoard; `QKClipMonitor`, its QK-Clip part alone."""

import warnings

import keras
import numpy as np
from keras import ops

from keras_muon.arguments import boolean
from keras_muon.arguments import positive_integer
from keras_muon.monitor import statistics
from keras_muon.muon import Muon
from keras_muon.naming import variable_path
from keras_muon.routing import route
from keras_muon.routing.views import wide_block
from keras_muon.update import momentum_storage

ROUTES = ("muon", "adamw")
ROUTE_METRICS = (
    "update_rms",
    "weight_rms",
    "update_ratio",
    "min_variable_ratio",
    "max_variable_ratio",
)
METRICS = (
    *(f"{r}_{m}" for r in ROUTES for m in ROUTE_METRICS),
    "ns_min_singular_value",
    "ns_max_singular_value",
    *(f"{r}_non_finite" for r in ROUTES),
    "max_logit",
    "clipped_heads",
)


class MuonMonitor(keras.callbacks.Callback):
    """Puts the numbers that tell how a Muon run is going in the logs.

    Every `every` training steps it measures, from the variables before
    and after that step (docs/monitoring.md defines each):
    - per route (`muon_*`, `adamw_*`): `update_rms` (RMS of the step's
      weight change `ΔW`), `weight_rms` (RMS of the weights), their ratio
      `update_ratio`, and the smallest and largest ratio of one variable
      (`min_variable_ratio`, `max_variable_ratio`);
    - `muon_non_finite`, `adamw_non_finite`: the number of variables whose
      moment holds a NaN or an infinity, so that had a non-finite gradient
      (the first one found is named in a warning, once);
    - at the first measured step, then every `singular_values_every`
      steps, `ns_min_singular_value` and `ns_max_singular_value`: the
      extreme singular values of Newton–Schulz's output for a sample of
      `sample_blocks` blocks, recomputed from the step's momentum with the
      optimizer's own settings;
    - with QK-Clip on, `max_logit` (the step's largest attention logit)
      and `clipped_heads`.
    The routes are the optimizer's; for an optimizer other than keras_muon's,
    the ones `keras_muon.Muon` would choose, and only the update and weight
    statistics.

    `values` holds the last measurement, and `history` every one (a
    list per metric, with `step`: None where a metric was not measured).
    Batch logs (the progress bar) get the `progress_bar` metrics, the last
    measured values; epoch logs (the `History`, and `TensorBoard` placed
    after this callback) get every metric, and with `per_variable=True`
    each variable's `update_ratio/<path>`. With `log_dir`, every
    measurement is also written to TensorBoard at its step: the metrics as
    scalars, the per-variable ratios of each route as histograms.

    Between measurements it does nothing, so it adds no host
    synchronization to those steps (on JAX, `fit` syncs its state into the
    variables only around a measured step; the callback is `async_safe`, so
    Keras need not wait for each step's logs) and works with compiled train
    steps. A measured step copies the trained weights once on the device;
    its numbers are computed when the next step begins (or the epoch, or
    training, ends). On TensorFlow the copy and the reductions each run as
    one compiled function, traced once per set of variable shapes. In a
    custom training loop, call `set_model(model)` (and pass `optimizer` if
    the model has none), then `on_train_batch_begin(step)` before each step
    and `on_train_end()` after the last.

    Args:
        every: Measure one step in `every`, an integer >= 1.
        singular_values_every: Also measure Newton–Schulz's singular values
            at the first measured step and one step in this many, a
            multiple of `every`; None for never.
        sample_blocks: Number of Muon blocks whose singular values are
            measured, spread over the Muon variables.
        per_variable: Whether epoch logs also get each variable's ratio.
        progress_bar: The metrics shown in the progress bar.
        log_dir: A directory for TensorBoard summaries (needs TensorFlow),
            or None.
        optimizer: The optimizer to watch; None for the model's.
    """

    # The groups of metrics this class measures.
    groups = ("updates", "non_finite", "singular_values", "qk_clip")
    # Measurements run at the start of the next step, on the main thread,
    # so Keras may leave the batch ends, and their host syncs, to a thread.
    async_safe = True

    def __init__(
        self,
        every=10,
        singular_values_every=100,
        sample_blocks=8,
        per_variable=False,
        progress_bar=("muon_update_ratio", "max_logit"),
        log_dir=None,
        optimizer=None,
    ):
        super().__init__()
        self.every = positive_integer("every", every)
        if singular_values_every is not None:
            positive_integer("singular_values_every", singular_values_every)
            if singular_values_every % every:
                raise ValueError(
                    "`singular_values_every` must be a multiple of `every`. Received: "
                    f"singular_values_every={singular_values_every!r}, every={every!r}"
                )
        self.singular_values_every = singular_values_every
        self.sample_blocks = positive_integer("sample_blocks", sample_blocks)
        self.per_variable = boolean("per_variable", per_variable)
        unknown = [name for name in progress_bar if name not in METRICS]
        if unknown:
            raise ValueError(
                f"Unknown `progress_bar` metrics {unknown}; choose among {list(METRICS)}."
            )
        self.progress_bar = tuple(progress_bar)
        self._writer = _summary_writer(log_dir) if log_dir is not None else None
        self._optimizer = optimizer
        self._step = 0  # steps begun, over the whole run
        self._pending = None  # the measured step, until it is measured
        self._before = None
        self._routes = None  # route → its trained variables, once known
        self.values = {}  # the last measurement: metric → value
        self.history = {"step": []}  # every measurement: metric → list
        self.variable_ratios = {}  # path → the last update_ratio of the variable
        self.first_non_finite = None  # (step, path) of the first seen
        self._epoch_max_logit, self._epoch_clipped = -np.inf, 0

    def _watched(self):
        optimizer = self._optimizer or self._model.optimizer
        return getattr(optimizer, "inner_optimizer", optimizer)

    def _measures(self, step):
        return (step + 1) % self.every == 0

    def _measures_singular_values(self, step):
        every = self.singular_values_every
        if every is None or "singular_values" not in self.groups:
            return False
        # The first measured step too: a run, or a first epoch, shorter
        # than `singular_values_every` steps would otherwise have none.
        return (step + 1) % every == 0 or step + 1 == self.every

    def on_train_batch_begin(self, batch, logs=None):
        self._finish_measurement()
        step, self._step = self._step, self._step + 1
        if not self._measures(step):
            return
        self._pending = step
        if "updates" not in self.groups:
            return
        _sync(self._model)
        variables = self._model.trainable_variables
        optimizer = self._watched()
        states = []  # the Muon momentums too, to rebuild the step's msign input
        if self._measures_singular_values(step) and isinstance(optimizer, Muon) and optimizer.built:
            states = _muon_states(optimizer)
        copies = _copies([_value(v) for v in variables] + [_momentum(s) for _, s in states])
        self._before = (
            {variable_path(v): c for v, c in zip(variables, copies)},
            {variable_path(v): c for (v, _), c in zip(states, copies[len(variables) :])},
        )

    def on_train_batch_end(self, batch, logs=None):
        # Keras may run this in a thread, beside the next step (`async_safe`):
        # it only shows the last measured values.
        if logs is not None:
            logs.update({k: self.values[k] for k in self.progress_bar if k in self.values})

    def on_train_end(self, logs=None):
        self._finish_measurement()

    def _finish_measurement(self):
        """Measures the pending step, now that it has run: at the next
        step's start, at an epoch's end or at the end of training."""
        if self._pending is not None:
            step, self._pending = self._pending, None
            _sync(self._model)
            self._measure(step)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_max_logit, self._epoch_clipped = -np.inf, 0

    def on_epoch_end(self, epoch, logs=None):
        self._finish_measurement()
        if logs is None:
            return
        logs.update(self.values)
        if "max_logit" in self.values:
            logs["max_logit"] = self._epoch_max_logit
            logs["clipped_heads"] = self._epoch_clipped
        if self.per_variable:
            logs.update({f"update_ratio/{p}": r for p, r in self.variable_ratios.items()})

    def _measure(self, step):
        optimizer = self._watched()
        values, ratios = {}, {}
        routes = self._measured_routes(optimizer)
        non_finite = "non_finite" in self.groups and isinstance(optimizer, Muon)
        states = _states(optimizer) if non_finite else []
        update_squares, weight_squares, finite = self._reductions(routes, states)
        values.update(self._update_statistics(routes, update_squares, weight_squares, ratios))
        if non_finite:
            values.update(self._non_finite(states, finite, step))
        if self._measures_singular_values(step) and isinstance(optimizer, Muon):
            values.update(self._singular_values(optimizer))
        if "qk_clip" in self.groups and self._has_qk_clip(optimizer):
            logits = optimizer.max_logits()
            values["max_logit"] = max((float(np.max(v)) for v in logits.values()), default=-np.inf)
            values["clipped_heads"] = optimizer.clipped_heads()
            self._epoch_max_logit = max(self._epoch_max_logit, values["max_logit"])
            self._epoch_clipped += values["clipped_heads"]
        self._before = None
        self.values.update(values)
        self.history["step"].append(step + 1)
        for name, value in values.items():
            # A metric measured less often is None at the other steps.
            column = self.history.setdefault(name, [None] * (len(self.history["step"]) - 1))
            column.append(value)
        for column in self.history.values():
            column.extend([None] * (len(self.history["step"]) - len(column)))
        self.variable_ratios.update({p: r for rows in ratios.values() for p, r in rows.items()})
        if self._writer is not None:
            self._writer(step + 1, values, ratios)

    def _has_qk_clip(self, optimizer):
        return getattr(optimizer, "qk_clip_threshold", None) is not None

    def _measured_routes(self, optimizer):
        """Route → its trained variables, where this step's update statistics
        are measured; else an empty dict."""
        if "updates" not in self.groups or self._before is None:
            return {}
        if not self._routes:  # routes do not change during training
            self._routes = _by_route(optimizer, self._model)
        return self._routes

    def _reductions(self, routes, states):
        """The step's reductions in one call (one graph on TensorFlow), on the
        host: `‖ΔW‖²` and `‖W‖²` of each variable of `routes`, in order, and
        whether the momentum of each of `states` is finite."""
        before, _ = self._before or ({}, {})
        variables = [v for group in routes.values() for v in group]
        if not variables and not states:
            return np.zeros(0), np.zeros(0), np.zeros(0, bool)
        reduced = _step_reductions(
            [before[variable_path(v)] for v in variables],
            [_value(v) for v in variables],
            [_momentum(s) for _, s in states],
        )
        update_squares, weight_squares, finite = (ops.convert_to_numpy(x) for x in reduced)
        return update_squares.astype(np.float64), weight_squares.astype(np.float64), finite

    def _update_statistics(self, routes, update_squares, weight_squares, ratios):
        values, start = {}, 0
        for name, variables in routes.items():
            end = start + len(variables)
            route_values, route_ratios = statistics.route_statistics(
                [int(np.prod(v.shape)) for v in variables],
                update_squares[start:end],
                weight_squares[start:end],
            )
            values.update({f"{name}_{k}": v for k, v in route_values.items()})
            ratios[name] = dict(zip([variable_path(v) for v in variables], route_ratios.tolist()))
            start = end
        return values

    def _non_finite(self, states, finite, step):
        values = {}
        for name in ROUTES:
            indices = [i for i, (_, s) in enumerate(states) if s.route.name == name]
            route_finite = finite[indices]
            values[f"{name}_non_finite"] = int(np.sum(~route_finite))
            if self.first_non_finite is None and not route_finite.all():
                path = variable_path(states[indices[int(np.argmin(route_finite))]][0])
                self.first_non_finite = (step + 1, path)
                warnings.warn(
                    f"MuonMonitor: a non-finite gradient reached `{path}` ({name}) by step "
                    f"{step + 1}; {values[f'{name}_non_finite']} {name} variables are affected.",
                    stacklevel=2,
                )
        return values

    def _singular_values(self, optimizer):
        _, momentums = self._before or (None, {})
        entries = list(_muon_states(optimizer))
        blocks = [
            (i, b) for i, (_, s) in enumerate(entries) for b in range(s.route.view.num_blocks)
        ]
        chosen = [blocks[i] for i in statistics.sample(self.sample_blocks, len(blocks))]
        by_shape = {}  # one msign call per block shape, as in the update
        for i, b in chosen:
            variable, state = entries[i]
            after = _momentum(state)
            before = momentums.get(variable_path(variable), ops.zeros_like(after))
            direction = statistics.orthogonalized_direction(
                before, after, optimizer.momentum, optimizer.nesterov
            )
            block = wide_block(state.route.view, direction, b)
            by_shape.setdefault(tuple(block.shape), []).append(block)
        if not by_shape:
            return {}
        ranges = [
            statistics.singular_value_range(optimizer, ops.stack(x)) for x in by_shape.values()
        ]
        return {
            "ns_min_singular_value": min(low for low, _ in ranges),
            "ns_max_singular_value": max(high for _, high in ranges),
        }


class QKClipMonitor(MuonMonitor):
    """Puts QK-Clip's statistics in the logs of `fit`, every step:
    `max_logit` (the step's largest attention logit, over all clipped
    layers and heads, before the clip) and `clipped_heads` in the batch
    logs, and so in the progress bar (those of the step before, measured
    as each step begins); the epoch's largest `max_logit` and its total of
    `clipped_heads` in the epoch logs, and so in the `History` and
    `TensorBoard`. `MuonMonitor` reports the same and more, every N steps.
    The optimizer must have been created with `qk_clip_threshold`."""

    groups = ("qk_clip",)

    def _has_qk_clip(self, optimizer):
        if getattr(optimizer, "qk_clip_threshold", None) is None:
            raise ValueError(
                "QKClipMonitor reports QK-Clip, which is off: create the optimizer with "
                f"`qk_clip_threshold`. Received: {type(optimizer).__name__} without one."
            )
        return True

    def __init__(self, log_dir=None, optimizer=None):
        super().__init__(
            every=1,
            singular_values_every=None,
            progress_bar=("max_logit", "clipped_heads"),
            log_dir=log_dir,
            optimizer=optimizer,
        )


def _momentum(state):
    """The momentum of `state` as the update reads it (a bfloat16 or int8
    one in float32)."""
    momentum = momentum_storage.read(state)
    return _value(momentum) if momentum is state.momentum else momentum


def _value(variable):
    """The variable's current value, outside any autodiff graph: torch
    records operations on parameters, the other backends record nothing
    outside a tape or trace (one operation less per variable there)."""
    value = variable.value
    return ops.stop_gradient(value) if keras.backend.backend() == "torch" else value


def _compiled(function):
    """`function`, of lists of tensors, as a measurement runs it. On
    TensorFlow, one graph, traced once per set of input shapes and dtypes
    and shared by every monitor: run eagerly, each of its few operations
    per variable is dispatched from Python, about 12 ms a measurement for
    a model of 38 variables, 3 to 5% of its training time at `every=10`.
    JAX and torch run it as it is, under 1% there."""
    if keras.backend.backend() != "tensorflow":
        return function
    import tensorflow as tf

    return tf.function(function, autograph=False)


_copies = _compiled(statistics.copies)
_step_reductions = _compiled(statistics.step_reductions)


def _sync(model):
    # JAX's `fit` keeps the training state outside the variables until synced.
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def _states(optimizer):
    """`(variable, VariableState)` of each variable `optimizer` updates."""
    if not optimizer.built:
        return []
    pairs = zip(optimizer._trainable_variables, optimizer._states)
    return [(v, s) for v, s in pairs if s.momentum is not None]


def _muon_states(optimizer):
    return [(v, s) for v, s in _states(optimizer) if s.route.view is not None]


def _by_route(optimizer, model):
    """The trained variables of each route: the optimizer's routes, or for
    another optimizer those `keras_muon.Muon` would choose."""
    if isinstance(optimizer, Muon):
        pairs = [(v, s.route.name) for v, s in _states(optimizer)]
    else:
        variables = model.trainable_variables
        pairs = zip(variables, (r.name for r in route.route_variables(variables, model)))
    groups = {}
    for variable, name in pairs:
        groups.setdefault(name, []).append(variable)
    return groups


def _summary_writer(log_dir):
    """A function that writes one measurement as TensorBoard summaries in
    `log_dir/train`, as `keras.callbacks.TensorBoard` lays its logs out."""
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            "MuonMonitor(log_dir=...) writes TensorBoard summaries with TensorFlow, which is not installed."
        ) from None
    writer = tf.summary.create_file_writer(f"{log_dir}/train")

    def write(step, values, ratios):
        with writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(f"monitor/{name}", value)
            for name, rows in ratios.items():
                defined = [r for r in rows.values() if np.isfinite(r)]
                if defined:
                    tf.summary.histogram(f"monitor/{name}_variable_ratios", np.asarray(defined))
        writer.flush()

    return write
