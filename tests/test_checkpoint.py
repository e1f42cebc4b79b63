"""Saving and loading the optimizer's state."""

import io
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import keras_muon
from tests.helpers import classifier_data
from tests.helpers import small_classifier


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
