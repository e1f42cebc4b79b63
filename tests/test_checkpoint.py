"""Saving and loading the optimizer's state."""

import io
import sys
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from keras_muon import checkpoint
from tests.helpers import classifier_data
from tests.helpers import small_classifier
from tests.qk_clip.attention import attention_model


@pytest.mark.parametrize(
    "optimizer_type", [keras_muon.Muon, keras_muon.NorMuon, keras_muon.AdaMuon]
)
def test_save_load_continue_equals_uninterrupted_training(tmp_path, optimizer_type):
    x, y = classifier_data()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    schedule = keras.optimizers.schedules.CosineDecay(0.02, decay_steps=20)

    def compiled_model():
        keras.utils.set_random_seed(1)
        model = small_classifier()
        model.compile(optimizer=optimizer_type(learning_rate=schedule, per_head=True), loss=loss)
        return model

    uninterrupted = compiled_model()
    uninterrupted.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)

    interrupted = compiled_model()
    interrupted.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    interrupted.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert type(restored.optimizer) is optimizer_type
    restored.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert int(restored.optimizer.iterations) == 16
    for got, want in zip(restored.weights, uninterrupted.weights):
        np.testing.assert_allclose(ops.convert_to_numpy(got), ops.convert_to_numpy(want), atol=1e-6)


def test_loading_state_saved_with_other_routes_is_an_error(tmp_path):
    def compiled_model(**kwargs):
        model = small_classifier()
        model.compile(optimizer=keras_muon.Muon(**kwargs), loss="mse")
        model.optimizer.build(model.trainable_variables)
        return model

    compiled_model().save(tmp_path / "model.keras")
    same = compiled_model()
    same.load_weights(tmp_path / "model.keras")
    other = compiled_model(exclude_layers=["hidden"])
    with pytest.raises(ValueError, match=r"other routes for 1 variables \['hidden/kernel'\]"):
        other.load_weights(tmp_path / "model.keras")


def test_hyperball_resumes_exactly_and_is_told_apart(tmp_path):
    x, y = classifier_data()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def compiled_model(**options):
        keras.utils.set_random_seed(1)
        model = small_classifier()
        model.compile(optimizer=keras_muon.Muon(learning_rate=0.02, **options), loss=loss)
        return model

    uninterrupted = compiled_model(hyperball=True)
    uninterrupted.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)
    interrupted = compiled_model(hyperball=True)
    interrupted.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    interrupted.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert restored.optimizer.hyperball
    restored.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for got, want in zip(restored.weights, uninterrupted.weights):
        np.testing.assert_allclose(ops.convert_to_numpy(got), ops.convert_to_numpy(want), atol=1e-6)
    # Without Hyperball the state has no radii: the file is refused.
    plain = compiled_model()
    plain.optimizer.build(plain.trainable_variables)
    with pytest.raises(ValueError, match=r"saved by Muon\(hyperball=True\)"):
        plain.load_weights(tmp_path / "model.keras")


@pytest.mark.parametrize(
    "saved_type, loading_type",
    [
        (keras_muon.NorMuon, keras_muon.AdaMuon),
        (keras_muon.AdaMuon, keras_muon.NorMuon),
        (keras_muon.Muon, keras_muon.NorMuon),
        (keras_muon.NorMuon, keras_muon.Muon),
    ],
)
def test_the_state_of_one_class_is_refused_by_another(tmp_path, saved_type, loading_type):
    def compiled_model(optimizer_type):
        keras.utils.set_random_seed(0)
        model = small_classifier()
        model.compile(optimizer=optimizer_type(), loss="mse")
        model.optimizer.build(model.trainable_variables)
        return model

    compiled_model(saved_type).save(tmp_path / "model.keras")
    with pytest.raises(
        ValueError, match=f"saved by {saved_type.__name__},.* Use {saved_type.__name__} to resume"
    ):
        compiled_model(loading_type).load_weights(tmp_path / "model.keras")


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def classifier_with(optimizer, build=True):
    """The small classifier, seeded, compiled with `optimizer`, which is
    built unless `build` is False."""
    keras.utils.set_random_seed(1)
    model = small_classifier()
    model.compile(optimizer=optimizer, loss=LOSS)
    if build:
        optimizer.build(model.trainable_variables)
    return model


def state_of(optimizer):
    """The optimizer's variables that hold training state, by position: all
    but its record of class, name and routes."""
    return checkpoint.positional_variables(optimizer)


def numpy_weights(model):
    return [ops.convert_to_numpy(w) for w in model.weights]


@pytest.mark.parametrize(
    "foreign, loading_type",
    [
        (lambda: keras.optimizers.AdamW(), keras_muon.AdaMuon),
        (lambda: keras.optimizers.AdamW(), keras_muon.Muon),
        (lambda: keras.optimizers.SGD(momentum=0.9), keras_muon.NorMuon),
        (lambda: keras.optimizers.Muon(), keras_muon.Muon),
    ],
)
def test_the_state_of_another_optimizer_is_refused_with_the_recipe(tmp_path, foreign, loading_type):
    x, y = classifier_data()
    saved = classifier_with(foreign(), build=False)
    saved.fit(x, y, batch_size=8, epochs=1, verbose=0)
    saved.save_weights(tmp_path / "foreign.weights.h5")
    model = classifier_with(loading_type())
    before = [ops.convert_to_numpy(v) for v in state_of(model.optimizer)]
    with pytest.raises(ValueError, match="not saved by a keras_muon optimizer") as error:
        model.load_weights(tmp_path / "foreign.weights.h5")
    assert "objects_to_skip=[model.optimizer]" in str(error.value)
    assert "compile=False" in str(error.value)
    for state, value in zip(state_of(model.optimizer), before, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(state), value)
    # The recipe: the weights alone, and a fresh optimizer state.
    model.load_weights(tmp_path / "foreign.weights.h5", objects_to_skip=[model.optimizer])
    for got, want in zip(numpy_weights(model), numpy_weights(saved), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(model.optimizer.iterations) == 0
    assert all(not np.any(ops.convert_to_numpy(v)) for v in state_of(model.optimizer)[2:])


def test_an_adamw_model_is_fine_tuned_with_muon_through_load_model(tmp_path):
    x, y = classifier_data()
    pretrained = classifier_with(keras.optimizers.AdamW(), build=False)
    pretrained.fit(x, y, batch_size=8, epochs=1, verbose=0)
    pretrained.save(tmp_path / "adamw.keras")
    model = keras.models.load_model(tmp_path / "adamw.keras", compile=False)
    model.compile(optimizer=keras_muon.Muon(learning_rate=0.02), loss=LOSS)
    for got, want in zip(numpy_weights(model), numpy_weights(pretrained), strict=True):
        np.testing.assert_array_equal(got, want)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 4


@pytest.mark.parametrize(
    "path_suffix, save",
    [
        ("weights.h5", lambda model, path: model.save_weights(path)),
        ("keras", lambda model, path: model.save(path)),
    ],
)
def test_state_loaded_before_the_optimizer_is_built_is_restored_when_it_builds(
    tmp_path, path_suffix, save
):
    """`compile()` then `load_weights()`, the recipe of Keras's
    ModelCheckpoint: the state is kept until `fit` builds the optimizer,
    then resumes exactly, with variant state and Hyperball's radii."""
    x, y = classifier_data()

    def optimizer():
        schedule = keras.optimizers.schedules.CosineDecay(0.02, decay_steps=20)
        return keras_muon.NorMuon(learning_rate=schedule, per_head=True, hyperball=True)

    uninterrupted = classifier_with(optimizer(), build=False)
    uninterrupted.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)
    interrupted = classifier_with(optimizer(), build=False)
    interrupted.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    path = tmp_path / f"model.{path_suffix}"
    save(interrupted, path)

    restored = classifier_with(optimizer(), build=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped with a warning
        restored.load_weights(path)
    assert not restored.optimizer.built
    restored.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert int(restored.optimizer.iterations) == 16
    for got, want in zip(numpy_weights(restored), numpy_weights(uninterrupted), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(
        state_of(restored.optimizer), state_of(uninterrupted.optimizer), strict=True
    ):
        np.testing.assert_array_equal(ops.convert_to_numpy(got), ops.convert_to_numpy(want))


def test_state_kept_for_the_build_is_checked_when_it_builds(tmp_path):
    classifier_with(keras_muon.Muon()).save_weights(tmp_path / "muon.weights.h5")
    model = classifier_with(keras_muon.Muon(exclude_layers=["hidden"]), build=False)
    model.load_weights(tmp_path / "muon.weights.h5")
    with pytest.raises(ValueError, match=r"other routes for 1 variables \['hidden/kernel'\]"):
        model.optimizer.build(model.trainable_variables)


@pytest.mark.parametrize(
    "saved_options, loading_options, named",
    [
        ({}, {"use_ema": True}, "use_ema=True"),
        ({"use_ema": True}, {}, "use_ema=False"),
        ({"gradient_accumulation_steps": 2}, {}, "gradient_accumulation_steps=None"),
        ({}, {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
        ({}, {"momentum_dtype": "int8"}, "momentum_dtype='int8'"),
        ({"momentum_dtype": "int8"}, {}, "momentum_dtype='float32'"),
    ],
)
def test_options_that_add_variables_must_match_and_are_named(
    tmp_path, saved_options, loading_options, named
):
    classifier_with(keras_muon.Muon(**saved_options)).save_weights(tmp_path / "m.weights.h5")
    model = classifier_with(keras_muon.Muon(**loading_options))
    with pytest.raises(ValueError, match="has [0-9]+ variables and this optimizer") as error:
        model.load_weights(tmp_path / "m.weights.h5")
    assert named in str(error.value)


def attention_model_with(optimizer):
    """The attention model, seeded, compiled with `optimizer`, built."""
    keras.utils.set_random_seed(0)
    model = attention_model()
    model.compile(optimizer=optimizer, loss=LOSS)
    optimizer.build(model.trainable_variables)
    return model


def test_state_of_other_block_shapes_is_refused_before_anything_is_assigned(tmp_path):
    # NorMuon keeps a second moment per block: per head, other shapes.
    attention_model_with(keras_muon.NorMuon(per_head=False)).save_weights(tmp_path / "m.weights.h5")
    optimizer = keras_muon.NorMuon(per_head=True)
    model = attention_model_with(optimizer)
    before = [ops.convert_to_numpy(v) for v in optimizer.variables]
    with pytest.raises(ValueError, match="other shapes, e.g. .*neuron_second_moment") as error:
        model.load_weights(tmp_path / "m.weights.h5")
    assert "per_head" in str(error.value) and "register_fused_projection" in str(error.value)
    for old, variable in zip(before, optimizer.variables):
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), old)


@pytest.mark.parametrize(
    "saved_threshold, loading_threshold, cause",
    [(None, 1.0, "saved without QK-Clip"), (1.0, None, "saved with QK-Clip")],
)
def test_qk_clip_toggled_between_save_and_load_is_named(
    tmp_path, saved_threshold, loading_threshold, cause
):
    def built(threshold):
        return attention_model_with(keras_muon.Muon(qk_clip_threshold=threshold))

    built(saved_threshold).save_weights(tmp_path / "m.weights.h5")
    with pytest.raises(ValueError, match=cause):
        built(loading_threshold).load_weights(tmp_path / "m.weights.h5")


def test_a_mixed_float16_model_loaded_under_float32_is_refused_with_the_policy_recipe(
    tmp_path,
):
    x, y = classifier_data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        saved = classifier_with(keras_muon.Muon(learning_rate=0.02), build=False)
        saved.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        assert isinstance(saved.optimizer, keras.optimizers.LossScaleOptimizer)
        saved.save(tmp_path / "mixed.keras")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(ValueError, match=r"set_global_policy\('mixed_float16'\)"):
        keras.models.load_model(tmp_path / "mixed.keras")
    # Under the policy it was saved with, it resumes exactly.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        restored = keras.models.load_model(tmp_path / "mixed.keras")
        restored.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        saved.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(restored.optimizer, keras.optimizers.LossScaleOptimizer)
    assert_exactly_equal(restored, saved)


@pytest.mark.xfail(
    strict=True,
    reason="Keras 3.15: a LossScaleOptimizer skips a store of another layout with a "
    "warning, and its inner optimizer is given no state (docs/checkpoints.md)",
)
def test_a_float32_model_loaded_under_mixed_float16_keeps_its_state(tmp_path):
    x, y = classifier_data()
    saved = classifier_with(keras_muon.Muon(learning_rate=0.02), build=False)
    saved.fit(x, y, batch_size=8, epochs=1, verbose=0)
    saved.save(tmp_path / "float32.keras")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        restored = keras.models.load_model(tmp_path / "float32.keras")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert int(restored.optimizer.iterations) == int(saved.optimizer.iterations)


@pytest.mark.parametrize(
    "load",
    [
        lambda model, path: model.set_weights(keras.models.load_model(path).get_weights()),
        lambda model, path: model.load_weights(
            path.with_suffix(".weights.h5"), objects_to_skip=[model.optimizer]
        ),
    ],
)
def test_hyperball_radii_are_the_norms_of_the_weights_it_trains(tmp_path, load):
    """Weights loaded after the optimizer is built (a pretrained model):
    the radii are their block norms, not those of the initial weights."""
    x, y = classifier_data()
    pretrained = classifier_with(keras.optimizers.AdamW(learning_rate=0.05), build=False)
    pretrained.fit(x, y, batch_size=8, epochs=3, verbose=0)
    pretrained.save(tmp_path / "pretrained.keras")
    pretrained.save_weights(tmp_path / "pretrained.weights.h5")
    model = classifier_with(keras_muon.Muon(learning_rate=0.01, hyperball=True))
    load(model, tmp_path / "pretrained.keras")
    hidden = model.get_layer("hidden").kernel
    loaded_norm = np.linalg.norm(ops.convert_to_numpy(hidden))
    assert loaded_norm != pytest.approx(
        np.linalg.norm(ops.convert_to_numpy(classifier_with(keras.optimizers.AdamW()).weights[1]))
    )
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    np.testing.assert_allclose(np.linalg.norm(ops.convert_to_numpy(hidden)), loaded_norm, rtol=1e-6)
    (radius,) = [s.radius for s in model.optimizer._states if s.radius is not None]
    np.testing.assert_allclose(ops.convert_to_numpy(radius), [loaded_norm], rtol=1e-6)


def test_a_file_without_optimizer_state_leaves_a_fresh_state(tmp_path):
    keras.utils.set_random_seed(1)
    small_classifier().save_weights(tmp_path / "uncompiled.weights.h5")
    unbuilt = classifier_with(keras_muon.Muon(), build=False)
    unbuilt.save(tmp_path / "unbuilt.keras")
    for path in ("uncompiled.weights.h5", "unbuilt.keras"):
        model = classifier_with(keras_muon.Muon())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.load_weights(tmp_path / path)
        assert int(model.optimizer.iterations) == 0
        assert all(not np.any(ops.convert_to_numpy(v)) for v in state_of(model.optimizer)[2:])


class Interrupt(keras.callbacks.Callback):
    """Raises at the start of epoch `epoch`, as a preemption would end it."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_exactly_in_a_fresh_model(tmp_path):
    x, y = classifier_data()

    def optimizer():
        return keras_muon.NorMuon(learning_rate=0.02, hyperball=True, per_head=True)

    uninterrupted = classifier_with(optimizer(), build=False)
    uninterrupted.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)
    backup = str(tmp_path / "backup")
    first = classifier_with(optimizer(), build=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(
            x,
            y,
            batch_size=8,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt(2)],
        )
    # A new process would build everything anew: model, optimizer, callback.
    restarted = classifier_with(optimizer(), build=False)
    history = restarted.fit(
        x,
        y,
        batch_size=8,
        epochs=4,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(backup)],
    )
    assert history.epoch == [2, 3]
    assert int(restarted.optimizer.iterations) == 16
    for got, want in zip(numpy_weights(restarted), numpy_weights(uninterrupted), strict=True):
        np.testing.assert_array_equal(got, want)


def test_sharded_weights_resume_exactly_and_keep_the_check(tmp_path):
    x, y = classifier_data()
    uninterrupted = classifier_with(keras_muon.AdaMuon(learning_rate=0.02), build=False)
    uninterrupted.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)
    interrupted = classifier_with(keras_muon.AdaMuon(learning_rate=0.02), build=False)
    interrupted.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    # Shards of at most 4 kB (the size is in GB): several files.
    interrupted.save_weights(tmp_path / "model.weights.json", max_shard_size=4e-6)
    assert len(list(tmp_path.glob("*.weights.h5"))) >= 3
    restored = classifier_with(keras_muon.AdaMuon(learning_rate=0.02))
    restored.load_weights(tmp_path / "model.weights.json")
    restored.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for got, want in zip(numpy_weights(restored), numpy_weights(uninterrupted), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="saved by AdaMuon"):
        classifier_with(keras_muon.Muon()).load_weights(tmp_path / "model.weights.json")


def lora_model(optimizer):
    """The small classifier with a LoRA adapter of rank 2 on its hidden
    layer, compiled with `optimizer` and built."""
    keras.utils.set_random_seed(1)
    model = small_classifier()
    model.get_layer("hidden").enable_lora(2)
    model.compile(optimizer=optimizer, loss=LOSS)
    optimizer.build(model.trainable_variables)
    return model


# The recipe of docs/checkpoints.md for a LoRA fine-tune: every variable
# unmerged, by path, with the optimizer's state.
def save_unmerged(model, path):
    state = model.get_state_tree(value_format="numpy_array")
    np.savez(path, **{"/".join(p): v for p, v in keras.tree.flatten_with_path(state)})


def load_unmerged(model, path):
    state = {}
    for key, value in np.load(path).items():
        *parents, leaf = key.split("/")
        node = state
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    model.set_state_tree(state)


def test_a_lora_fine_tune_resumes_exactly_from_its_unmerged_state(tmp_path):
    x, y = classifier_data()

    def optimizer():
        # Named: the state tree is keyed by the optimizer's name, which Keras
        # numbers (muon, muon_1, ...) when it is left to it.
        return keras_muon.Muon(learning_rate=0.02, name="fine_tune")

    uninterrupted = lora_model(optimizer())
    fit_steps = dict(batch_size=8, shuffle=False, verbose=0)
    uninterrupted.fit(x, y, epochs=4, **fit_steps)
    interrupted = lora_model(optimizer())
    interrupted.fit(x, y, epochs=2, **fit_steps)
    save_unmerged(interrupted, tmp_path / "fine_tune.npz")
    restored = lora_model(optimizer())
    load_unmerged(restored, tmp_path / "fine_tune.npz")
    restored.fit(x, y, epochs=2, **fit_steps)
    assert int(restored.optimizer.iterations) == 16
    for got, want in zip(numpy_weights(restored), numpy_weights(uninterrupted), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.xfail(
    strict=True,
    reason="Keras 3.15 merges LoRA factors into the kernel on save and zeroes them on load",
)
def test_a_lora_fine_tune_resumes_exactly_from_a_keras_weights_file(tmp_path):
    x, y = classifier_data()
    uninterrupted = lora_model(keras_muon.Muon(learning_rate=0.02))
    uninterrupted.fit(x, y, epochs=4, batch_size=8, shuffle=False, verbose=0)
    interrupted = lora_model(keras_muon.Muon(learning_rate=0.02))
    interrupted.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    interrupted.save_weights(tmp_path / "fine_tune.weights.h5")
    restored = lora_model(keras_muon.Muon(learning_rate=0.02))
    restored.load_weights(tmp_path / "fine_tune.weights.h5")
    restored.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    for got, want in zip(numpy_weights(restored), numpy_weights(uninterrupted), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


class WithUnusedLayer(keras.Model):
    """A classifier with a Dense layer that is built and trained but not
    called: it gets no gradient."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, name="hidden")
        self.head = keras.layers.Dense(4, name="head")
        self.unused = keras.layers.Dense(8, name="unused")

    def build(self, input_shape):
        self.unused.build(input_shape)

    def call(self, x):
        return self.head(self.hidden(x))


def test_a_variable_without_gradient_keeps_its_state_and_is_decayed_on_jax_only(tmp_path):
    """Keras's trainers differ: JAX's gives a variable that takes no part in
    the loss a zero gradient, so weight decay still shrinks it; TensorFlow's
    and torch's give None, and the variable is skipped. Either way its state
    is created, saved and restored."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6)).astype("float32"), rng.integers(0, 4, size=(16,))

    def trained(epochs):
        keras.utils.set_random_seed(1)
        model = WithUnusedLayer()
        model(x[:1])
        model.compile(optimizer=keras_muon.Muon(learning_rate=0.02, weight_decay=0.1), loss=LOSS)
        kernel = ops.convert_to_numpy(model.unused.kernel)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TF and torch: "Gradients do not exist"
            model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
        return model, kernel

    model, initial = trained(epochs=1)
    steps = int(model.optimizer.iterations)
    decayed = (1 - 0.02 * 0.1) ** steps if keras.backend.backend() == "jax" else 1.0
    np.testing.assert_allclose(
        ops.convert_to_numpy(model.unused.kernel), initial * decayed, rtol=1e-6
    )
    paths = [v.path for v in model.optimizer.variables]
    assert any("unused_kernel_momentum" in path for path in paths), paths
    model.save_weights(tmp_path / "m.weights.h5")
    restored, _ = trained(epochs=0)
    restored.load_weights(tmp_path / "m.weights.h5")
    restored.optimizer.build(restored.trainable_variables)  # if fit did not
    for got, want in zip(state_of(restored.optimizer), state_of(model.optimizer), strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(got), ops.convert_to_numpy(want))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's own format")
@pytest.mark.xfail(
    strict=True,
    reason="tf.train.Checkpoint restores by attribute name, without keras_muon's check "
    "(docs/checkpoints.md)",
)
def test_tf_train_checkpoint_of_another_optimizer_is_refused(tmp_path):
    import tensorflow as tf

    x, y = classifier_data()
    adamw = classifier_with(keras.optimizers.AdamW(), build=False)
    adamw.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tf.train.Checkpoint(model=adamw, optimizer=adamw.optimizer).save(tmp_path / "c")
    model = classifier_with(keras_muon.AdaMuon())
    with pytest.raises(ValueError):
        tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(path)


@pytest.mark.parametrize(
    "loading, error",
    [
        (lambda: keras_muon.NorMuon(learning_rate=0.02), "named 'opt'.*name='opt'"),
        (lambda: keras_muon.AdaMuon(learning_rate=0.02, name="opt"), "saved by NorMuon"),
        (
            lambda: keras_muon.NorMuon(exclude_layers=["hidden"], name="opt"),
            r"other routes for 1 variables \['hidden/kernel'\]",
        ),
    ],
)
def test_a_state_tree_of_another_optimizer_is_refused(loading, error):
    """Keras's state tree restores variables by path and never calls the
    optimizer; keras_muon's record of class, name and routes is one of
    them, and refuses another's."""
    saved = classifier_with(keras_muon.NorMuon(learning_rate=0.02, name="opt"))
    state = saved.get_state_tree(value_format="numpy_array")
    assert "keras_muon" in state["optimizer_variables"]
    with pytest.raises(ValueError, match=error):
        classifier_with(loading()).set_state_tree(state)
    same = classifier_with(keras_muon.NorMuon(learning_rate=0.02, name="opt"))
    same.set_state_tree(state)


def test_orbax_checkpoints_resume_exactly_and_are_checked(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    x, y = classifier_data()

    def optimizer(name="opt", optimizer_type=keras_muon.NorMuon):
        return optimizer_type(learning_rate=0.02, per_head=True, name=name)

    uninterrupted = classifier_with(optimizer(), build=False)
    uninterrupted.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)
    interrupted = classifier_with(optimizer(), build=False)
    orbax = keras.callbacks.OrbaxCheckpoint(str(tmp_path / "orbax"), save_on_background=False)
    interrupted.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[orbax])

    restored = keras.models.load_model(tmp_path / "orbax")
    built_then_loaded = classifier_with(optimizer())
    built_then_loaded.load_weights(tmp_path / "orbax")
    for model in (restored, built_then_loaded):
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        assert int(model.optimizer.iterations) == 16
        for got, want in zip(numpy_weights(model), numpy_weights(uninterrupted), strict=True):
            np.testing.assert_array_equal(got, want)

    for loading, error in [
        (optimizer(name=None), "named 'opt'"),
        (optimizer(optimizer_type=keras_muon.AdaMuon), "saved by NorMuon"),
    ]:
        with pytest.raises(ValueError, match=error):
            classifier_with(loading).load_weights(tmp_path / "orbax")
    # Loaded before the build, only the step counter would be restored.
    unbuilt = classifier_with(optimizer(), build=False)
    unbuilt.load_weights(tmp_path / "orbax")
    with pytest.raises(ValueError, match="none of its moments were restored"):
        unbuilt.fit(x, y, batch_size=8, epochs=1, verbose=0)


def resumed_in_a_fresh_model(tmp_path, optimizer, save):
    """(a run saved after 2 epochs by `save(model, path)` and resumed from
    the file in a fresh model for 2 more, the same run going on in its own
    model). Both fit twice: Keras's `fit` ends by writing the moving
    averages into the weights (`use_ema`)."""
    x, y = classifier_data()
    fit_steps = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)
    going_on = classifier_with(optimizer(), build=False)
    going_on.fit(x, y, **fit_steps)
    save(going_on, tmp_path / "model.keras")
    restored = classifier_with(optimizer(), build=False)
    restored.load_weights(tmp_path / "model.keras")
    going_on.fit(x, y, **fit_steps)
    restored.fit(x, y, **fit_steps)
    return restored, going_on


def assert_exactly_equal(restored, uninterrupted):
    assert int(restored.optimizer.iterations) == int(uninterrupted.optimizer.iterations)
    for got, want in zip(numpy_weights(restored), numpy_weights(uninterrupted), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(
        state_of(restored.optimizer), state_of(uninterrupted.optimizer), strict=True
    ):
        np.testing.assert_array_equal(ops.convert_to_numpy(got), ops.convert_to_numpy(want))


def test_model_checkpoint_weights_only_resumes_exactly_from_the_epoch_2_file(tmp_path):
    x, y = classifier_data()
    fit_steps = dict(batch_size=8, shuffle=False, verbose=0)
    path = str(tmp_path / "epoch{epoch}.weights.h5")
    uninterrupted = classifier_with(keras_muon.Muon(learning_rate=0.02), build=False)
    callback = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
    uninterrupted.fit(x, y, epochs=4, callbacks=[callback], **fit_steps)
    # Keras's recipe: compile, then load the file of epoch 2.
    restored = classifier_with(keras_muon.Muon(learning_rate=0.02), build=False)
    restored.load_weights(tmp_path / "epoch2.weights.h5")
    restored.fit(x, y, epochs=2, **fit_steps)
    assert_exactly_equal(restored, uninterrupted)


def test_gradient_accumulation_saved_mid_cycle_resumes_exactly(tmp_path):
    """Saved after 8 batches, 2 into a cycle of 3 accumulated gradients."""
    restored, going_on = resumed_in_a_fresh_model(
        tmp_path,
        lambda: keras_muon.NorMuon(learning_rate=0.02, gradient_accumulation_steps=3),
        lambda model, path: model.save(path),
    )
    assert_exactly_equal(restored, going_on)


def test_moving_averages_are_restored_with_the_rest(tmp_path):
    """`use_ema`: the averages are in the file and restored in their slots
    (training on after it is not compared: on JAX, Keras 3.15 fails a
    second `fit` of a model with `use_ema`, with or without a file)."""
    x, y = classifier_data()
    saved = classifier_with(keras_muon.NorMuon(learning_rate=0.02, use_ema=True), build=False)
    saved.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    saved.save(tmp_path / "model.keras")
    restored = classifier_with(keras_muon.NorMuon(learning_rate=0.02, use_ema=True), build=False)
    restored.load_weights(tmp_path / "model.keras")
    restored.optimizer.build(restored.trainable_variables)
    assert any("average" in v.path for v in state_of(restored.optimizer))
    assert_exactly_equal(restored, saved)


def test_state_dtypes_after_a_load_under_another_policy_are_a_fresh_optimizers(tmp_path):
    """Saved under float32 and loaded under bfloat16: the state of 16-bit
    variables is float32, as a fresh optimizer's, and training goes on."""
    x, y = classifier_data()
    saved = classifier_with(keras_muon.AdaMuon(learning_rate=0.02), build=False)
    saved.fit(x, y, batch_size=8, epochs=1, verbose=0)
    saved.save_weights(tmp_path / "float32.weights.h5")
    keras.mixed_precision.set_global_policy("bfloat16")
    try:
        fresh = classifier_with(keras_muon.AdaMuon(learning_rate=0.02))
        loaded = classifier_with(keras_muon.AdaMuon(learning_rate=0.02))
        loaded.load_weights(tmp_path / "float32.weights.h5")
        loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    dtypes = [(v.dtype, tuple(v.shape)) for v in state_of(loaded.optimizer)]
    assert dtypes == [(v.dtype, tuple(v.shape)) for v in state_of(fresh.optimizer)]
    assert all(np.isfinite(w).all() for w in numpy_weights(loaded))


def test_a_shape_changing_option_is_refused_naming_the_variable(tmp_path):
    classifier_with(keras_muon.NorMuon()).save_weights(tmp_path / "m.weights.h5")
    model = classifier_with(keras_muon.NorMuon(neuron_axis="output"))
    with pytest.raises(ValueError, match="hidden_kernel_neuron_second_moment"):
        model.load_weights(tmp_path / "m.weights.h5")


def test_enabling_lora_after_pretraining_refuses_the_pretraining_state(tmp_path):
    classifier_with(keras_muon.Muon()).save_weights(tmp_path / "pretrained.weights.h5")
    keras.utils.set_random_seed(1)
    model = small_classifier()
    model.get_layer("hidden").enable_lora(2)
    model.compile(optimizer=keras_muon.Muon(), loss=LOSS)
    model.optimizer.build(model.trainable_variables)
    with pytest.raises(
        ValueError, match="saved for 5 trained variables, and this optimizer trains 6"
    ):
        model.load_weights(tmp_path / "pretrained.weights.h5")
    model.load_weights(tmp_path / "pretrained.weights.h5", objects_to_skip=[model.optimizer])
    routes = {row["path"]: row["route"] for row in model.optimizer.routing_table()}
    assert routes["hidden/lora_kernel_a"] == routes["hidden/lora_kernel_b"] == "muon"
    assert "hidden/kernel" not in routes  # frozen: no state


# Models saved mid-training by earlier releases: by 0.1.0 (commit d733209)
# on JAX, and by 0.2.0 on each backend, with `KERAS_BACKEND=<backend> python
# -m tests.test_checkpoint tests/data/saved_by_0.2.0 0.2.0` (0.1.0's script
# wrote bare names):
# each file resumes here, on every backend, as uninterrupted training would
# go, its state in the same slots.
DATA = Path(__file__).parent / "data"
SAVED_OPTIMIZERS = {
    "muon": lambda: keras_muon.Muon(
        learning_rate=0.02, per_head=True, cautious_weight_decay=True, qk_clip_threshold=1.0
    ),
    "normuon": lambda: keras_muon.NorMuon(learning_rate=0.02, neuron_axis="output"),
    "adamuon": lambda: keras_muon.AdaMuon(learning_rate=0.02, sign_input=False),
    "normuon_hyperball": lambda: keras_muon.NorMuon(learning_rate=0.02, hyperball=True),
}
# (folder, file stem, optimizer)
SAVED_FILES = [("saved_by_0.1.0", name, name) for name in ("muon", "normuon", "adamuon")] + [
    ("saved_by_0.2.0", f"{backend}_{name}", name)
    for backend in ("jax", "tensorflow", "torch")
    for name in ("muon", "normuon_hyperball")
]


def saved_model_and_data():
    """The model the files were saved from, with its initial weights, and
    the data: 32 sequences of 8 tokens, 4 steps of 8 per epoch."""
    tokens = keras.Input((8,), dtype="int32")
    x = keras.layers.Embedding(16, 8, name="embed")(tokens)
    # Without biases: the key bias has no gradient but round-off, which
    # AdamW's normalized step turns into differences between backends.
    attention = keras.layers.MultiHeadAttention(2, 4, use_bias=False, name="attention")
    x = x + attention(x, x, use_causal_mask=True)
    x = keras.layers.LayerNormalization(name="norm")(x)
    x = x + keras.layers.Dense(8, name="down")(keras.layers.Dense(24, name="up")(x))
    model = keras.Model(tokens, keras.layers.Dense(16, name="head")(x))
    rng = np.random.default_rng(0)
    model.set_weights([0.3 * rng.standard_normal(w.shape).astype("float32") for w in model.weights])
    data = rng.integers(0, 16, size=(32, 9))
    return model, (data[:, :-1], data[:, 1:])


def compiled(model, optimizer):
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def saved_optimizer_state(path):
    """The optimizer's variables stored in the `.keras` file at `path`, in
    order, read with h5py."""
    import h5py

    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as weights:
        with h5py.File(io.BytesIO(weights.read()), "r") as store:
            saved = store["optimizer"]["vars"]
            # Beside the variables, by position: the class and the routes.
            assert {key for key in saved if not key.isdigit()} == {"class", "routes"}
            # Numbers only: tools that flatten state take no strings or objects.
            assert all(np.issubdtype(saved[key].dtype, np.number) for key in saved)
            return [np.asarray(saved[key]) for key in sorted(filter(str.isdigit, saved), key=int)]


@pytest.mark.parametrize("folder, stem, name", SAVED_FILES)
def test_a_model_saved_by_an_earlier_release_resumes_as_uninterrupted_training(folder, stem, name):
    model, (x, y) = saved_model_and_data()
    uninterrupted = compiled(model, SAVED_OPTIMIZERS[name]())
    uninterrupted.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    path = DATA / folder / f"{stem}.keras"
    restored = keras.models.load_model(path)
    if keras.backend.backend() == "torch":
        # The file keeps JAX's jit_compile=True, torch.compile on torch:
        # minutes of compiling, and tested in test_muon.py already.
        restored.jit_compile = False
    assert type(restored.optimizer) is type(uninterrupted.optimizer)
    # The optimizer's state is the file's, in the same slots.
    for state, saved in zip(state_of(restored.optimizer), saved_optimizer_state(path), strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(state), saved, err_msg=state.path)
    assert int(restored.optimizer.iterations) == 4
    restored.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    # The file holds one backend's first 4 steps; backends round differently.
    for got, want in zip(restored.weights, uninterrupted.weights):
        np.testing.assert_allclose(ops.convert_to_numpy(got), ops.convert_to_numpy(want), atol=1e-5)
    # Optimizer state by path within the optimizer, whose name can differ.
    states = {v.path.split("/", 1)[1]: v for v in state_of(uninterrupted.optimizer)}
    restored_states = {v.path.split("/", 1)[1]: v for v in state_of(restored.optimizer)}
    assert restored_states.keys() == states.keys()
    for path, state in restored_states.items():
        np.testing.assert_allclose(
            ops.convert_to_numpy(state), ops.convert_to_numpy(states[path]), atol=1e-5, err_msg=path
        )


if __name__ == "__main__":
    output, release = Path(sys.argv[1]), sys.argv[2]
    output.mkdir(parents=True, exist_ok=True)
    for folder, stem, name in SAVED_FILES:
        if folder != f"saved_by_{release}" or not stem.startswith(keras.backend.backend()):
            continue
        model, (x, y) = saved_model_and_data()
        compiled(model, SAVED_OPTIMIZERS[name]()).fit(
            x, y, batch_size=8, epochs=1, shuffle=False, verbose=0
        )
        model.save(output / f"{stem}.keras")
