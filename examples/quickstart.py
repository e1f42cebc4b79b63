"""Train a small character-level transformer with keras_muon.Muon and AdamW.

The text is CPython's own documentation (`pydoc_data.topics`, shipped with
every Python), so nothing is downloaded. The script prints how Muon routes
each variable, trains the same model from the same initial weights with
`keras_muon.Muon()` and `keras.optimizers.AdamW()` on the same batches and
learning-rate schedule, and prints the validation loss of both.

    KERAS_BACKEND=jax python examples/quickstart.py --steps 300
"""

import argparse
import time

import keras
import numpy as np
from pydoc_data.topics import topics

import keras_muon

SEQUENCE_LENGTH = 64
VOCABULARY = 256  # bytes


def text_batches(batch_size, seed):
    """Train and validation arrays of byte sequences from the pydoc topics."""
    data = np.frombuffer("\n".join(topics.values()).encode("utf-8"), np.uint8)
    split = int(0.9 * len(data))
    rng = np.random.default_rng(seed)

    def sample(part, count):
        starts = rng.integers(0, len(part) - SEQUENCE_LENGTH - 1, size=count)
        windows = np.stack([part[s : s + SEQUENCE_LENGTH + 1] for s in starts])
        return windows[:, :-1].astype("int32"), windows[:, 1:].astype("int32")

    return sample(data[:split], batch_size), sample(data[split:], 512)


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per position."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=input_shape[1:], initializer="random_normal", name="embeddings"
        )

    def call(self, x):
        return x + self.embeddings


def transformer(width=128, depth=2, heads=4):
    tokens = keras.Input((SEQUENCE_LENGTH,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, width, name="token_embedding")(tokens)
    x = PositionEmbedding(name="position_embedding")(x)
    for i in range(depth):
        h = keras.layers.LayerNormalization(name=f"block{i}_norm1")(x)
        h = keras.layers.MultiHeadAttention(heads, width // heads, name=f"block{i}_attention")(
            h, h, use_causal_mask=True
        )
        x = x + h
        h = keras.layers.LayerNormalization(name=f"block{i}_norm2")(x)
        h = keras.layers.Dense(4 * width, activation="gelu", name=f"block{i}_up")(h)
        x = x + keras.layers.Dense(width, name=f"block{i}_down")(h)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    logits = keras.layers.Dense(VOCABULARY, name="lm_head")(x)
    return keras.Model(tokens, logits)


def train(optimizer, initial_weights, args):
    model = transformer()
    model.set_weights(initial_weights)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    (x, y), validation = text_batches(args.batch_size * args.steps, args.seed)
    start = time.perf_counter()
    model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False)
    seconds = time.perf_counter() - start
    return model.evaluate(*validation, verbose=0), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak learning rate of both optimizers (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and data (default 0)")
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    initial_weights = transformer().get_weights()

    def schedule():
        # Linear warm-up over 10% of the steps, then cosine decay to 10%.
        warmup = max(1, args.steps // 10)
        return keras.optimizers.schedules.CosineDecay(
            0.0, args.steps - warmup, alpha=0.1,
            warmup_target=args.learning_rate, warmup_steps=warmup,
        )

    muon = keras_muon.Muon(learning_rate=schedule())
    results = {
        "keras_muon.Muon": train(muon, initial_weights, args),
        "keras.optimizers.AdamW": train(
            keras.optimizers.AdamW(learning_rate=schedule()), initial_weights, args
        ),
    }
    muon.summary()
    print(f"\nbackend {keras.backend.backend()}, {args.steps} steps of {args.batch_size}×{SEQUENCE_LENGTH} bytes")
    print(f"{'optimizer':<24} {'validation loss':>15} {'seconds':>8}")
    for name, (loss, seconds) in results.items():
        print(f"{name:<24} {loss:>15.4f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
