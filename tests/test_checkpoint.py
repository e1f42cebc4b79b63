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
    before = [ops.convert_to_numpy(v) for v in model.optimizer.variables]
    with pytest.raises(ValueError, match="not saved by a keras_muon optimizer") as error:
        model.load_weights(tmp_path / "foreign.weights.h5")
    assert "objects_to_skip=[model.optimizer]" in str(error.value)
    assert "compile=False" in str(error.value)
    for state, value in zip(model.optimizer.variables, before, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(state), value)
    # The recipe: the weights alone, and a fresh optimizer state.
    model.load_weights(tmp_path / "foreign.weights.h5", objects_to_skip=[model.optimizer])
    for got, want in zip(numpy_weights(model), numpy_weights(saved), strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(model.optimizer.iterations) == 0
    assert all(not np.any(ops.convert_to_numpy(v)) for v in model.optimizer.variables[2:])


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
        restored.optimizer.variables, uninterrupted.optimizer.variables, strict=True
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


@pytest.mark.parametrize(
    "saved_threshold, loading_threshold, cause",
    [(None, 1.0, "saved without QK-Clip"), (1.0, None, "saved with QK-Clip")],
)
def test_qk_clip_toggled_between_save_and_load_is_named(
    tmp_path, saved_threshold, loading_threshold, cause
):
    def built(threshold):
        keras.utils.set_random_seed(0)
        model = attention_model()
        optimizer = keras_muon.Muon(qk_clip_threshold=threshold)
        model.compile(optimizer=optimizer, loss=LOSS)
        optimizer.build(model.trainable_variables)
        return model

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
        saved.fit(x, y, batch_size=8, epochs=1, verbose=0)
        assert isinstance(saved.optimizer, keras.optimizers.LossScaleOptimizer)
        saved.save(tmp_path / "mixed.keras")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(ValueError, match=r"set_global_policy\('mixed_float16'\)"):
        keras.models.load_model(tmp_path / "mixed.keras")


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
        assert all(not np.any(ops.convert_to_numpy(v)) for v in model.optimizer.variables[2:])


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


# Models saved mid-training by keras_muon 0.1.0 (commit d733209), on JAX,
# with `python tests/test_checkpoint.py tests/data/saved_by_0.1.0`: each
# file resumes here, on every backend, as uninterrupted training would go.
SAVED_BY_0_1_0 = Path(__file__).parent / "data" / "saved_by_0.1.0"
SAVED_OPTIMIZERS = {
    "muon": lambda: keras_muon.Muon(
        learning_rate=0.02, per_head=True, cautious_weight_decay=True, qk_clip_threshold=1.0
    ),
    "normuon": lambda: keras_muon.NorMuon(learning_rate=0.02, neuron_axis="output"),
    "adamuon": lambda: keras_muon.AdaMuon(learning_rate=0.02, sign_input=False),
}


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
            return [np.asarray(saved[key]) for key in sorted(filter(str.isdigit, saved), key=int)]


@pytest.mark.parametrize("name", list(SAVED_OPTIMIZERS))
def test_a_model_saved_by_0_1_0_resumes_as_uninterrupted_training(name):
    model, (x, y) = saved_model_and_data()
    uninterrupted = compiled(model, SAVED_OPTIMIZERS[name]())
    uninterrupted.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)

    path = SAVED_BY_0_1_0 / f"{name}.keras"
    restored = keras.models.load_model(path)
    if keras.backend.backend() == "torch":
        # The file keeps JAX's jit_compile=True, torch.compile on torch:
        # minutes of compiling, and tested in test_muon.py already.
        restored.jit_compile = False
    assert type(restored.optimizer) is type(uninterrupted.optimizer)
    # The optimizer's state is the file's, in the same slots.
    for state, saved in zip(restored.optimizer.variables, saved_optimizer_state(path), strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(state), saved, err_msg=state.path)
    assert int(restored.optimizer.iterations) == 4
    restored.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    # The file holds JAX's first 4 steps; backends round differently.
    for got, want in zip(restored.weights, uninterrupted.weights):
        np.testing.assert_allclose(ops.convert_to_numpy(got), ops.convert_to_numpy(want), atol=1e-5)
    # Optimizer state by path within the optimizer, whose name can differ.
    states = {v.path.split("/", 1)[1]: v for v in uninterrupted.optimizer.variables}
    restored_states = {v.path.split("/", 1)[1]: v for v in restored.optimizer.variables}
    assert restored_states.keys() == states.keys()
    for path, state in restored_states.items():
        np.testing.assert_allclose(
            ops.convert_to_numpy(state), ops.convert_to_numpy(states[path]), atol=1e-5, err_msg=path
        )


if __name__ == "__main__":
    output = Path(sys.argv[1])
    output.mkdir(parents=True, exist_ok=True)
    for name, make_optimizer in SAVED_OPTIMIZERS.items():
        model, (x, y) = saved_model_and_data()
        compiled(model, make_optimizer()).fit(
            x, y, batch_size=8, epochs=1, shuffle=False, verbose=0
        )
        model.save(output / f"{name}.keras")
