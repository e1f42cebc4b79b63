"""The same model, weights and data trained on TensorFlow, JAX and torch."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="starts all three backends itself, so it runs in the JAX session only",
)

BACKENDS = ("tensorflow", "jax", "torch")

TRAIN = """
import sys
import keras
import numpy as np
import keras_muon

tokens = keras.Input((16,), dtype="int32")
x = keras.layers.Embedding(32, 24, name="embed")(tokens)
x = keras.layers.MultiHeadAttention(4, 6, name="attention")(x, x, use_causal_mask=True)
x = keras.layers.LayerNormalization(name="norm")(x)
x = keras.layers.Conv1D(24, 3, padding="causal", groups=2, name="conv")(x)
x = keras.layers.LSTM(16, return_sequences=True, name="lstm")(x)
x = keras.layers.Dense(48, activation="gelu", name="ffn")(x)
logits = keras.layers.Dense(32, name="head")(x)
model = keras.Model(tokens, logits)

rng = np.random.default_rng(0)
initial = [0.2 * rng.standard_normal(w.shape).astype("float32") for w in model.weights]
model.set_weights(initial)
# Few distinct tokens: every batch repeats rows of the embedding.
data = rng.integers(0, 6, size=(64, 17))
model.compile(
    optimizer=eval(sys.argv[2]),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
model.fit(data[:, :-1], data[:, 1:], batch_size=16, epochs=2, shuffle=False, verbose=0)
final = [keras.ops.convert_to_numpy(w) for w in model.weights]
np.savez(sys.argv[1], *[np.stack([a, b]) for a, b in zip(initial, final)])
"""


OPTIMIZERS = [
    "keras_muon.Muon(learning_rate=0.01, weight_decay=0.1, per_head=True)",
    "keras_muon.NorMuon(learning_rate=0.01, weight_decay=0.1, cautious_weight_decay=True)",
    "keras_muon.AdaMuon(learning_rate=0.01, weight_decay=0.1)",
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_backends_agree(tmp_path, optimizer):
    root = Path(__file__).resolve().parent.parent
    runs = {}
    for backend in BACKENDS:
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(root))
        out = tmp_path / f"{backend}.npz"
        runs[backend] = (
            out,
            subprocess.Popen(
                [sys.executable, "-c", TRAIN, str(out), optimizer],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
    weights = {}
    for backend, (out, process) in runs.items():
        log = process.communicate(timeout=600)[0]
        assert process.returncode == 0, f"{backend} failed:\n{log[-3000:]}"
        with np.load(out) as saved:
            weights[backend] = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    for backend in ("tensorflow", "torch"):
        for ours, theirs in zip(weights[backend], weights["jax"]):
            np.testing.assert_array_equal(ours[0], theirs[0])
            assert np.abs(ours[1] - theirs[1]).max() <= 1e-4, backend
    # Training moved the variables well beyond the tolerance; all but the
    # attention's key bias, which softmax makes gradient-free.
    moved = [np.abs(after - before).max() > 1e-2 for before, after in weights["jax"]]
    assert sum(moved) == len(moved) - 1
