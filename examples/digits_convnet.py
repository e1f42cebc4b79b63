"""Train a small convnet on scikit-learn's bundled 8×8 digits with
keras_muon.Muon, keras.optimizers.AdamW and keras.optimizers.Muon, and
compare them.

The 1,797 images ship with scikit-learn (`sklearn.datasets.load_digits`), so
nothing is downloaded; 20% are held out for validation. keras_muon reads
each Conv2D kernel (kh, kw, c_in, c_out) as the (kh·kw·c_in, c_out) matrix
it multiplies, and gives the classifier to AdamW. Every optimizer starts
from the same initial weights, sees the same batches in the same order and
follows the same schedule shape (10% linear warm-up, then cosine decay to
10%) peaking at its own default learning rate (`--learning-rate` gives
them all one peak instead).

Prints how keras_muon routes each variable, Keras's progress bar per
epoch, and a table of validation accuracy, loss and wall time; writes
the curves to <output>/digits_convnet.png and .json.

    KERAS_BACKEND=jax python examples/digits_convnet.py
"""

import keras
import numpy as np

import common


def digits(seed):
    """Train and validation `(images, labels)`: 8×8×1 floats in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype("float32")[..., None]
    labels = data.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(0.8 * len(labels))
    train, validation = order[:split], order[split:]
    return (images[train], labels[train]), (images[validation], labels[validation])


def digits_convnet(width=32):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="average")(x)
    x = keras.layers.Dense(2 * width, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(10, name="classifier")(x)
    return keras.Model(inputs, outputs, name="digits_convnet")


def epoch_order(train, epochs, seed):
    """`epochs` shuffled passes over `train`, concatenated: the one data
    order every optimizer sees."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(train[1])) for _ in range(epochs)])
    return train[0][order], train[1][order]


def main(argv=None):
    parser = common.argument_parser(__doc__, epochs=20)
    parser.add_argument(
        "--batch-size", type=common.positive_int, default=32, help="images per step (default 32)"
    )
    parser.add_argument(
        "--width",
        type=common.positive_int,
        default=32,
        help="filters of the first convolutions (default 32)",
    )
    args = parser.parse_args(argv)

    train, validation = digits(args.seed)
    steps_per_epoch = len(train[1]) // args.batch_size
    if not steps_per_epoch:
        parser.error(
            f"--batch-size {args.batch_size} is larger than the {len(train[1])} training images"
        )
    steps = args.epochs * steps_per_epoch
    train = epoch_order(train, args.epochs, args.seed)
    keras.utils.set_random_seed(args.seed)
    weights = digits_convnet(args.width).get_weights()

    def train_one(name, peak):
        return common.train(
            name,
            peak,
            lambda: digits_convnet(args.width),
            weights,
            (train, validation),
            steps,
            args.batch_size,
            steps_per_epoch,
            {
                "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                "metrics": ["accuracy"],
            },
        )

    return common.compare(
        args,
        "digits_convnet",
        f"digits convnet, {args.epochs} epochs of {steps_per_epoch} steps × {args.batch_size} images",
        train_one,
        {"validation accuracy": "val_accuracy", "validation loss": "val_loss"},
        ["val_accuracy", "val_loss"],
    )


if __name__ == "__main__":
    main()
