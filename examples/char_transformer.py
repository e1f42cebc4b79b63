"""Train a small GPT-style byte-level language model with keras_muon.Muon,
keras.optimizers.AdamW and keras.optimizers.Muon, and compare them.

The text is CPython's own documentation (`pydoc_data.topics`, about 465k
characters shipped with every Python), so nothing is downloaded. The model
is built from Keras layers: Embedding, causal MultiHeadAttention, Dense and
LayerNormalization. Every optimizer starts from the same initial weights,
sees the same batches in the same order and follows the same schedule
shape (10% linear warm-up, then cosine decay to 10%) peaking at its own
default learning rate, as a user who does not tune would run it
(`--learning-rate` gives them all one peak instead).

Prints how keras_muon routes each variable, Keras's progress bar per
evaluation interval, and a table of validation loss and wall time;
writes the curves to <output>/char_transformer.png and .json. With
`--monitor N`, each run has a `keras_muon.MuonMonitor` measuring every N
steps, and its curves (update-to-weight ratio of the hidden matrices and
of the rest, weight RMS, Newton–Schulz's singular values) go to
<output>/char_transformer_monitor.png.

    KERAS_BACKEND=jax python examples/char_transformer.py [--monitor 10]
"""

import keras
from keras import ops

import common
import keras_muon

VOCABULARY = 256  # bytes


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per position."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=input_shape[1:], initializer="random_normal", name="embeddings"
        )

    def call(self, x):
        return x + self.embeddings


class FusedAttention(keras.layers.Layer):
    """Causal self-attention whose query, key and value come from one
    `Dense(3·width)` kernel, `[q | k | v]` with the heads of each
    consecutive (as in Swin, SAM or SD3)."""

    def __init__(self, heads, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads

    def build(self, input_shape):
        width = input_shape[-1]
        self.qkv = keras.layers.Dense(3 * width, name="qkv")
        self.qkv.build(input_shape)
        self.out = keras.layers.Dense(width, name="out")
        self.out.build(input_shape)

    def call(self, x):
        length, width = x.shape[1], x.shape[2]
        qkv = ops.reshape(self.qkv(x), (-1, length, 3, self.heads, width // self.heads))
        q, k, v = (qkv[:, :, i] for i in range(3))
        attended = ops.dot_product_attention(q, k, v, is_causal=True)
        return self.out(ops.reshape(attended, (-1, length, width)))


class FusedSwiGLU(keras.layers.Layer):
    """`down(silu(gate)·up)`, gate and up from one `Dense(2·hidden)`
    kernel, `[gate | up]` (as in DINOv2's SwiGLU)."""

    def __init__(self, hidden, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden

    def build(self, input_shape):
        self.gate_up = keras.layers.Dense(2 * self.hidden, name="gate_up")
        self.gate_up.build(input_shape)
        self.down = keras.layers.Dense(input_shape[-1], name="down")
        self.down.build((*input_shape[:-1], self.hidden))

    def call(self, x):
        h = self.gate_up(x)
        return self.down(ops.silu(h[..., : self.hidden]) * h[..., self.hidden :])


def declare_fused_projections():
    """Tells keras_muon the parts of the fused kernels above, so that it
    orthogonalizes q, k, v, gate and up each on its own."""
    keras_muon.register_fused_projection(
        FusedAttention, "qkv", lambda layer: keras_muon.FusedLayout.equal("qkv", layer.heads)
    )
    keras_muon.register_fused_projection(
        FusedSwiGLU, "gate_up", lambda layer: keras_muon.FusedLayout.equal(("gate", "up"))
    )


def char_transformer(sequence_length=64, width=128, depth=2, heads=4, fused=False):
    """A pre-norm decoder-only transformer over bytes, returning logits;
    with `fused`, its attention and feed-forward layers compute with fused
    kernels (`FusedAttention`, `FusedSwiGLU` of about the same size)."""
    tokens = keras.Input((sequence_length,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, width, name="token_embedding")(tokens)
    x = PositionEmbedding(name="position_embedding")(x)
    for i in range(depth):
        h = keras.layers.LayerNormalization(name=f"block{i}_norm1")(x)
        if fused:
            h = FusedAttention(heads, name=f"block{i}_attention")(h)
        else:
            h = keras.layers.MultiHeadAttention(heads, width // heads, name=f"block{i}_attention")(
                h, h, use_causal_mask=True
            )
        x = x + h
        h = keras.layers.LayerNormalization(name=f"block{i}_norm2")(x)
        if fused:
            x = x + FusedSwiGLU(8 * width // 3, name=f"block{i}_swiglu")(h)
            continue
        h = keras.layers.Dense(4 * width, activation="gelu", name=f"block{i}_up")(h)
        x = x + keras.layers.Dense(width, name=f"block{i}_down")(h)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    logits = keras.layers.Dense(VOCABULARY, name="lm_head")(x)
    return keras.Model(tokens, logits, name="char_transformer")


def text_data(args):
    """The training windows in the order every optimizer sees them, and the
    validation windows."""
    return common.text_windows(
        args.sequence_length, args.steps * args.batch_size, args.validation_size, args.seed
    )


def model_builder(args):
    fused = getattr(args, "fused", None)
    if fused == "parts":
        declare_fused_projections()
    return lambda: char_transformer(
        args.sequence_length, args.width, args.depth, args.heads, fused=bool(fused)
    )


def initial_weights(args):
    keras.utils.set_random_seed(args.seed)
    return model_builder(args)().get_weights()


LOSS = {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}


def main(argv=None):
    parser = common.argument_parser(__doc__, steps=300)
    common.add_text_model_flags(parser)
    parser.add_argument(
        "--monitor",
        type=common.positive_int,
        metavar="N",
        help="measure each run with keras_muon.MuonMonitor every N steps and plot its curves",
    )
    args = parser.parse_args(argv)
    weights, data = initial_weights(args), text_data(args)
    monitors = {}

    def train_one(name, peak):
        callbacks = []
        if args.monitor:
            monitors[name] = keras_muon.MuonMonitor(
                every=args.monitor, singular_values_every=args.monitor
            )
            callbacks.append(monitors[name])
        return common.train(
            name,
            peak,
            model_builder(args),
            weights,
            data,
            args.steps,
            args.batch_size,
            args.eval_every,
            LOSS,
            callbacks=callbacks,
        )

    rows = common.compare(
        args,
        "char_transformer",
        f"char transformer, {args.steps} steps of {args.batch_size}×{args.sequence_length} bytes",
        train_one,
        {"validation loss": "val_loss"},
        ["val_loss", "loss"],
    )
    if monitors:
        print(f"plot: {plot_monitor(args.output, {n: m.history for n, m in monitors.items()})}")
    return rows


def plot_monitor(output, histories):
    """Draws `MuonMonitor.history` of each run ({optimizer: history}) to
    <output>/char_transformer_monitor.png, and returns its path."""
    common.save_json(output, "char_transformer_monitor", histories)
    pyplot = common.pyplot()
    # panel title: {metric: label suffix}
    panels = {
        "hidden matrices (keras_muon's Muon route): ΔW RMS / W RMS": {"muon_update_ratio": ""},
        "the rest (embeddings, head, biases, norms): ΔW RMS / W RMS": {"adamw_update_ratio": ""},
        "hidden matrices: weight RMS": {"muon_weight_rms": ""},
        "Newton–Schulz output: extreme singular values": {
            "ns_min_singular_value": ", smallest",
            "ns_max_singular_value": ", largest",
        },
    }
    figure, axes = pyplot.subplots(2, 2, figsize=(11, 7))
    for axis, (title, metrics) in zip(axes.flat, panels.items()):
        for name, history in histories.items():
            for metric, suffix in metrics.items():
                points = [
                    (s, v)
                    for s, v in zip(history["step"], history.get(metric, []))
                    if v is not None
                ]
                if points:
                    axis.plot(*zip(*points), label=name + suffix)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = output / "char_transformer_monitor.png"
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path


if __name__ == "__main__":
    main()
