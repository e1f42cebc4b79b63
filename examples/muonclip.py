"""Train the byte-level transformer of char_transformer.py with Muon at a
high, constant learning rate, with and without QK-Clip, and compare.

Both runs start from the same weights and see the same batches. The
unclipped run records its attention logits without clipping them (a
threshold no logit reaches). Prints, per run, the largest attention logit
over training and over its last tenth, the steps whose largest logit
exceeds 1.25τ, the heads clipped, and the final validation loss; plots the largest logit and the training loss per step
to <output>/muonclip.png and writes them to <output>/muonclip.json.

    KERAS_BACKEND=jax python examples/muonclip.py
"""

import keras
import numpy as np

import common
import keras_muon
from char_transformer import LOSS
from char_transformer import initial_weights
from char_transformer import model_builder
from char_transformer import text_data

RECORD_ONLY = 1e30  # a threshold no logit reaches: records, never clips


class StepRecorder(keras.callbacks.Callback):
    """Each step's training loss."""

    def on_train_begin(self, logs=None):
        self.curves = {"step": [], "loss": []}
        self._mean = None

    def on_train_batch_end(self, batch, logs=None):
        # Keras logs the running mean of the epoch's loss: undo the mean.
        step = len(self.curves["step"]) + 1
        mean = logs["loss"]
        loss = mean if self._mean is None else step * mean - (step - 1) * self._mean
        self._mean = mean
        self.curves["step"].append(step)
        self.curves["loss"].append(loss)


def train(args, weights, data, threshold, reference):
    (x, y), validation = data
    model = model_builder(args)()
    model.set_weights(weights)
    optimizer = keras_muon.Muon(learning_rate=args.learning_rate, qk_clip_threshold=threshold)
    model.compile(optimizer=optimizer, **LOSS)
    recorder, monitor = StepRecorder(), keras_muon.QKClipMonitor()
    history = model.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[monitor, recorder],
    )
    curves = recorder.curves
    curves["max_logit"] = monitor.history["max_logit"]  # of every step
    tail = curves["max_logit"][-max(1, len(curves["max_logit"]) // 10) :]
    row = {
        "largest logit": max(curves["max_logit"]),
        "largest logit, last 10%": max(tail),
        "steps > 1.25τ": sum(v > 1.25 * reference for v in curves["max_logit"]),
        "heads clipped": int(history.history["clipped_heads"][0]),
        "validation loss": float(model.evaluate(*validation, batch_size=256, verbose=0)),
    }
    return row, curves


def main(argv=None):
    parser = common.argument_parser(__doc__, steps=360, learning_rate=False)
    common.add_text_model_flags(parser)
    parser.set_defaults(batch_size=32)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=0.03,
        help="Muon's constant learning rate (default 0.03)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=100.0,
        help="QK-Clip's threshold τ (default 100, as in Kimi K2)",
    )
    args = parser.parse_args(argv)
    weights, data = initial_weights(args), text_data(args)
    runs = {
        "Muon": train(args, weights, data, RECORD_ONLY, args.threshold),
        f"Muon + QK-Clip τ={args.threshold:g}": train(
            args, weights, data, args.threshold, args.threshold
        ),
    }
    rows = [{"run": name, **row} for name, (row, _) in runs.items()]
    backend = keras.backend.backend()
    common.print_table(
        f"{args.steps} steps of {args.batch_size}×{args.sequence_length} bytes, "
        f"lr {args.learning_rate:g}, {backend}",
        rows,
    )
    curves = {name: curve for name, (_, curve) in runs.items()}
    common.save_json(args.output, "muonclip", {"rows": rows, "curves": curves, "backend": backend})
    plot(args, curves)
    return rows


def plot(args, curves):
    plt = common.pyplot()
    figure, (logits, losses) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        logits.plot(curve["step"], curve["max_logit"], label=name)
        losses.plot(curve["step"], curve["loss"], label=name)
    logits.axhline(args.threshold, color="gray", linestyle="--", linewidth=1, label="τ")
    logits.set_yscale("log")
    logits.set_ylabel("largest attention logit of the step")
    losses.set_ylabel("training loss")
    losses.set_ylim(top=float(np.percentile(curves[next(iter(curves))]["loss"], 90)))
    for axis in (logits, losses):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"QK-Clip on the char transformer ({keras.backend.backend()})")
    figure.tight_layout()
    args.output.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output / "muonclip.png", dpi=120)


if __name__ == "__main__":
    main()
