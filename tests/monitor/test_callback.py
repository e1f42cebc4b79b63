"""MuonMonitor and QKClipMonitor in `fit`'s logs, in custom loops and in
TensorBoard, checked against values computed from the variables."""

import re
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon.monitor import callback
from keras_muon.monitor import statistics
from tests.helpers import classifier_data
from tests.helpers import random_arrays
from tests.helpers import small_classifier
from tests.qk_clip.attention import fit_one_step
from tests.qk_clip.attention import without_learning

BACKEND = keras.backend.backend()
LEARNING_RATE = 0.01


class WeightRecorder(keras.callbacks.Callback):
    """The trained weights before and after the batch `batch`."""

    def __init__(self, batch):
        super().__init__()
        self.batch, self.before, self.after, self.batch_logs = batch, None, None, []

    def _weights(self):
        variables = self.model.trainable_variables + self.model.optimizer.variables
        return {v.path: ops.convert_to_numpy(v.value).astype(np.float64) for v in variables}

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.batch:
            self.before = self._weights()

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append(dict(logs))
        if batch == self.batch:
            self.after = self._weights()


def fit(optimizer, monitor, steps=4, jit_compile="auto", callbacks=(), epochs=1):
    keras.utils.set_random_seed(0)
    model = small_classifier()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    x, y = classifier_data(8 * steps)
    recorder = WeightRecorder(steps - 1)
    history = model.fit(
        x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=[monitor, recorder, *callbacks]
    )
    return model, history, recorder


def expected_statistics(recorder, groups):
    """Update and weight RMS per route, and per-variable ratios, computed
    from the weights before and after the recorded step."""
    expected = {}
    for name, paths in groups.items():
        updates = [recorder.after[p] - recorder.before[p] for p in paths]
        weights = [recorder.after[p] for p in paths]
        size = sum(w.size for w in weights)
        update_rms = np.sqrt(sum(np.sum(u**2) for u in updates) / size)
        weight_rms = np.sqrt(sum(np.sum(w**2) for w in weights) / size)
        ratios = [np.sqrt(np.mean(u**2) / np.mean(w**2)) for u, w in zip(updates, weights)]
        expected.update(
            {
                f"{name}_update_rms": update_rms,
                f"{name}_weight_rms": weight_rms,
                f"{name}_update_ratio": update_rms / weight_rms,
                f"{name}_min_variable_ratio": min(ratios),
                f"{name}_max_variable_ratio": max(ratios),
            }
        )
    return expected


JIT = [False] if BACKEND == "torch" else [False, True]


@pytest.mark.parametrize("jit_compile", JIT)
def test_update_statistics_are_those_of_the_weight_change_of_the_step(jit_compile):
    optimizer = keras_muon.Muon(learning_rate=LEARNING_RATE)
    monitor = keras_muon.MuonMonitor(every=2, singular_values_every=None, per_variable=True)
    _, history, recorder = fit(optimizer, monitor, jit_compile=jit_compile)
    groups = {}
    for row in optimizer.routing_table():
        groups.setdefault(row["route"], []).append(row["path"])
    assert sorted(groups) == ["adamw", "muon"]
    for name, want in expected_statistics(recorder, groups).items():
        assert history.history[name] == [pytest.approx(want, rel=1e-4)], name
    assert history.history["muon_non_finite"] == history.history["adamw_non_finite"] == [0]
    assert "ns_min_singular_value" not in history.history
    # per_variable=True: each variable's own ratio in the epoch logs.
    for path in groups["muon"] + groups["adamw"]:
        update = recorder.after[path] - recorder.before[path]
        want = np.sqrt(np.mean(update**2) / np.mean(recorder.after[path] ** 2))
        assert history.history[f"update_ratio/{path}"] == [pytest.approx(want, rel=1e-4)], path
    # The progress bar gets the chosen metric once the first measured step
    # (the second) has been measured, as the third begins.
    shown = [sorted(k for k in logs if "_" in k) for logs in recorder.batch_logs]
    assert shown == [[], [], ["muon_update_ratio"], ["muon_update_ratio"]]


def test_any_other_optimizer_is_measured_on_the_routes_keras_muon_would_choose():
    monitor = keras_muon.MuonMonitor(every=4)
    model, history, recorder = fit(keras.optimizers.AdamW(learning_rate=LEARNING_RATE), monitor)
    table = keras_muon.Muon()
    model.compile(optimizer=table, loss="mse")
    table.build(model.trainable_variables)
    groups = {}
    for row in table.routing_table():
        groups.setdefault(row["route"], []).append(row["path"])
    for name, want in expected_statistics(recorder, groups).items():
        assert history.history[name] == [pytest.approx(want, rel=1e-4)], name
    assert not {"muon_non_finite", "ns_min_singular_value", "max_logit"} & set(history.history)


@pytest.mark.parametrize("ns_steps", [3, 5])
def test_singular_values_are_those_of_the_update_the_optimizer_applied(ns_steps):
    optimizer = keras_muon.Muon(learning_rate=LEARNING_RATE, weight_decay=0.0, ns_steps=ns_steps)
    monitor = keras_muon.MuonMonitor(every=2, singular_values_every=4)
    _, history, recorder = fit(optimizer, monitor)
    (row,) = [row for row in optimizer.routing_table() if row["route"] == "muon"]
    path = row["path"]
    # The update the step applied, `W ← W − lr·s·O` (no weight decay), and
    # the direction it orthogonalized, from the momentum before and after.
    applied = (recorder.before[path] - recorder.after[path]) / (LEARNING_RATE * row["scale"])
    momentum = [m for m in recorder.after if m.endswith(path.replace("/", "_") + "_momentum")]
    (momentum,) = momentum
    before, after = recorder.before[momentum], recorder.after[momentum]
    direction = optimizer.momentum * after + (after - optimizer.momentum * before)
    want = statistics.singular_value_range_of(direction[None], applied[None])
    assert history.history["ns_min_singular_value"] == [pytest.approx(want[0], rel=1e-3)]
    assert history.history["ns_max_singular_value"] == [pytest.approx(want[1], rel=1e-3)]
    # Measured at the first measured step, then every 4 steps.
    assert monitor.history["step"] == [2, 4]
    first, last = monitor.history["ns_min_singular_value"]
    assert 0 < first < 1.2 and last == history.history["ns_min_singular_value"][0]
    # Fewer steps orthogonalize less: 3 steps of Polar Express stop short.
    assert (want[0] < 0.5) == (ns_steps == 3)


def test_non_finite_gradients_are_counted_per_route_and_the_first_named():
    model = small_classifier()
    optimizer = keras_muon.Muon()
    optimizer.attach(model)
    monitor = keras_muon.MuonMonitor(every=1, singular_values_every=None, optimizer=optimizer)
    monitor.set_model(model)
    variables = model.trainable_variables
    grads = [np.ones(v.shape, "float32") for v in variables]
    logs = {}
    monitor.on_train_batch_begin(0)
    optimizer.apply(grads, variables)
    monitor.on_train_batch_end(0, logs)
    assert monitor.values == {}  # measured when the next step begins
    hidden = [v.path for v in variables].index("hidden/kernel")
    grads[hidden][0, 0] = np.nan
    monitor.on_train_batch_begin(1)
    assert monitor.values["muon_non_finite"] == monitor.values["adamw_non_finite"] == 0
    optimizer.apply(grads, variables)
    monitor.on_train_batch_end(1, logs)
    assert logs == {"muon_update_ratio": monitor.values["muon_update_ratio"]}
    with pytest.warns(UserWarning, match="hidden/kernel"):
        monitor.on_train_end()
    assert monitor.values["muon_non_finite"] == 1 and monitor.values["adamw_non_finite"] == 0
    assert monitor.first_non_finite == (2, "hidden/kernel")
    assert monitor.history["step"] == [1, 2]
    # Named once: later steps count, without warning again.
    monitor.on_train_batch_begin(2)
    optimizer.apply(grads, variables)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.on_train_end()
    assert not [w for w in caught if "MuonMonitor" in str(w.message)]
    assert monitor.values["muon_non_finite"] == 1


def test_a_short_fit_with_the_default_arguments_has_singular_values_from_its_first_epoch():
    # 12 steps an epoch: shorter than `singular_values_every` (100), longer
    # than `every` (10).
    monitor = keras_muon.MuonMonitor()
    _, history, _ = fit(keras_muon.Muon(learning_rate=LEARNING_RATE), monitor, steps=12, epochs=2)
    assert monitor.history["step"] == [10, 20]
    assert [v is None for v in monitor.history["ns_min_singular_value"]] == [False, True]
    for name in ("ns_min_singular_value", "ns_max_singular_value"):
        # The epoch logs hold the last measured value: step 10's in both.
        assert history.history[name] == [monitor.history[name][0]] * 2, name
    low, high = (
        history.history["ns_min_singular_value"][0],
        history.history["ns_max_singular_value"][0],
    )
    assert 0.5 < low <= high < 1.2  # 5 steps of Polar Express: about [0.84, 1.12]


@pytest.mark.parametrize(
    "every, singular_values_every, measured",
    [(2, 6, [2, 6, 12]), (3, 3, [3, 6, 9, 12]), (4, 4 * 100, [4])],
)
def test_after_the_first_measured_step_singular_values_keep_their_cadence(
    every, singular_values_every, measured
):
    model = small_classifier()
    optimizer = keras_muon.Muon()
    optimizer.attach(model)
    monitor = keras_muon.MuonMonitor(
        every=every, singular_values_every=singular_values_every, optimizer=optimizer
    )
    monitor.set_model(model)
    variables = model.trainable_variables
    for step in range(13):
        monitor.on_train_batch_begin(step)
        optimizer.apply(random_arrays([v.shape for v in variables], seed=step), variables)
    monitor.on_train_end()
    steps = monitor.history["step"]
    assert steps == list(range(every, 14, every))
    values = monitor.history["ns_max_singular_value"]
    assert [s for s, v in zip(steps, values) if v is not None] == measured


ON_TENSORFLOW = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="measurements are compiled on TensorFlow only"
)


@ON_TENSORFLOW
def test_a_compiled_measurement_gives_the_numbers_of_the_eager_one():
    shapes = [(48, 16), (16,), (20, 8), (3, 4, 5)]
    before = random_arrays(shapes, seed=5)
    after = [
        keras.Variable(x, dtype=dtype)
        for x, dtype in zip(
            random_arrays(shapes, seed=6), ["float32", "float32", "bfloat16", "float16"]
        )
    ]
    moments = random_arrays(shapes, seed=7)
    moments[3][0, 1, 2] = np.inf
    inputs = (
        [ops.cast(b, a.dtype) for b, a in zip(before, after)],
        [a.value for a in after],  # what the monitor passes: TensorFlow variables
        moments,
    )
    compiled = callback._step_reductions(*inputs)
    eager = statistics.step_reductions(*inputs)
    for c, e in zip(compiled, eager):
        np.testing.assert_allclose(ops.convert_to_numpy(c), ops.convert_to_numpy(e), rtol=1e-6)
    assert ops.convert_to_numpy(compiled[2]).tolist() == [True, True, True, False]
    for c, a in zip(callback._copies(inputs[1]), after):
        np.testing.assert_array_equal(ops.convert_to_numpy(c), ops.convert_to_numpy(a))


@ON_TENSORFLOW
def test_compiled_measurements_are_traced_once_per_set_of_shapes():
    compiled = (callback._copies, callback._step_reductions)
    traces = [[f.experimental_get_tracing_count() for f in compiled]]
    for _ in range(2):  # each fit with a monitor of its own
        monitor = keras_muon.MuonMonitor(every=1, singular_values_every=3)
        fit(keras_muon.Muon(learning_rate=LEARNING_RATE), monitor, steps=7)
        assert monitor.history["step"] == list(range(1, 8))
        traces.append([f.experimental_get_tracing_count() for f in compiled])
    # 7 measured steps: the copies traced at most twice (with the momentums,
    # at singular-value steps, and without), the reductions at most once
    # (none if an earlier test traced them for the same model)...
    assert traces[1][0] - traces[0][0] <= 2 and traces[1][1] - traces[0][1] <= 1
    # ...and reused by the next monitor.
    assert traces[2] == traces[1]


def read_events(directory):
    import tensorflow as tf

    tags = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_a_tensorboard_log_holds_the_monitors_scalars_and_histograms(tmp_path):
    optimizer = keras_muon.Muon(learning_rate=LEARNING_RATE)
    monitor = keras_muon.MuonMonitor(every=2, singular_values_every=4, log_dir=tmp_path)
    fit(optimizer, monitor, callbacks=[keras.callbacks.TensorBoard(tmp_path)])
    tags = read_events(tmp_path / "train")
    # From TensorBoard's own callback, which reads the epoch logs.
    for name in ("muon_update_ratio", "adamw_weight_rms", "ns_min_singular_value"):
        assert tags[f"epoch_{name}"] == [0], name
    # Written by the monitor at each measured step.
    assert tags["monitor/muon_update_ratio"] == [2, 4]
    assert tags["monitor/ns_max_singular_value"] == [2, 4]
    assert tags["monitor/muon_variable_ratios"] == [2, 4]


def counting(function, calls):
    def counted():
        calls.append(1)
        return function()

    return counted


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's fit keeps its state outside the variables")
def test_only_measured_steps_sync_the_training_state():
    counts = []
    for monitor in (None, keras_muon.MuonMonitor(every=5)):
        keras.utils.set_random_seed(0)
        model = small_classifier()
        model.compile(
            optimizer=keras_muon.Muon(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        syncs = []
        model.jax_state_sync = counting(model.jax_state_sync, syncs)
        model.fit(
            *classifier_data(80),
            batch_size=8,
            verbose=0,
            callbacks=[monitor] if monitor else [],
        )
        counts.append(len(syncs))
    # 10 steps, 2 measured, each synced before and after.
    assert counts[1] - counts[0] == 4


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"every": 0}, "`every` must be an integer >= 1"),
        ({"every": 2.0}, "`every` must be an integer >= 1"),
        ({"every": 10, "singular_values_every": 15}, "multiple of `every`"),
        ({"sample_blocks": -1}, "`sample_blocks`"),
        ({"per_variable": 1}, "`per_variable` must be True or False"),
        (
            {"progress_bar": ["update_ratio"]},
            "Unknown `progress_bar` metrics ['update_ratio']",
        ),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        keras_muon.MuonMonitor(**arguments)


def test_qk_clip_monitor_reports_in_the_history():
    model, (inputs, targets, _), before, threshold, optimizer = without_learning(4)
    # Two steps on the same batch: the second sees the clipped logits.
    history = fit_one_step(
        model,
        optimizer,
        np.concatenate([inputs] * 2),
        np.concatenate([targets] * 2),
        callbacks=[keras_muon.QKClipMonitor()],
    )
    np.testing.assert_allclose(history.history["max_logit"], [before.max()], rtol=1e-5)
    assert history.history["clipped_heads"][0] >= np.sum(before > threshold)
    assert not any(name.startswith("muon_") for name in history.history)


def test_muon_monitor_reports_qk_clip_at_its_measured_steps():
    model, (inputs, targets, _), _, threshold, optimizer = without_learning(4)
    monitor = keras_muon.MuonMonitor(every=2)
    history = fit_one_step(
        model,
        optimizer,
        np.concatenate([inputs] * 2),
        np.concatenate([targets] * 2),
        callbacks=[monitor],
    )
    # The second step's logits: those the first step's clip left, at most τ.
    assert 0 < history.history["max_logit"][0] <= threshold * (1 + 1e-5)
    assert history.history["clipped_heads"] == [optimizer.clipped_heads()]


def test_qk_clip_monitor_needs_qk_clip():
    keras.utils.set_random_seed(0)
    model = small_classifier()
    model.compile(
        optimizer=keras_muon.Muon(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with pytest.raises(ValueError, match="qk_clip_threshold"):
        model.fit(
            *classifier_data(8),
            batch_size=8,
            verbose=0,
            callbacks=[keras_muon.QKClipMonitor()],
        )
