"""What the examples share: offline data, the optimizers they compare, the
learning-rate schedule, a training loop that records curves, and the output
(a table on stdout, a PNG plot and the curves as JSON).
"""

import argparse
import functools
import json
import time
from pathlib import Path

import keras
import numpy as np

import keras_muon

# The optimizers the examples and benchmarks run, by the name the tables
# print (and `--optimizer` takes).
OPTIMIZERS = {
    "keras_muon.Muon": keras_muon.Muon,
    "keras.optimizers.AdamW": keras.optimizers.AdamW,
    "keras.optimizers.Muon": keras.optimizers.Muon,
    "keras_muon.Muon cautious_weight_decay=True": functools.partial(
        keras_muon.Muon, cautious_weight_decay=True
    ),
    "keras_muon.NorMuon": keras_muon.NorMuon,
    "keras_muon.NorMuon neuron_axis=output": functools.partial(
        keras_muon.NorMuon, neuron_axis="output"
    ),
    "keras_muon.AdaMuon": keras_muon.AdaMuon,
    "keras_muon.AdaMuon sign_input=False": functools.partial(keras_muon.AdaMuon, sign_input=False),
    "keras_muon.Muon hyperball=True": functools.partial(keras_muon.Muon, hyperball=True),
    "keras_muon.NorMuon hyperball=True": functools.partial(keras_muon.NorMuon, hyperball=True),
}
# The ones an example compares when no `--optimizer` is given.
COMPARED = ("keras_muon.Muon", "keras.optimizers.AdamW", "keras.optimizers.Muon")


def peak_learning_rate(name, requested=None):
    """`requested`, or else the `learning_rate` that optimizer `name` gets
    when none is given."""
    if requested is not None:
        return requested
    return float(keras.ops.convert_to_numpy(OPTIMIZERS[name]().learning_rate))


def warmup_cosine(peak, steps):
    """Linear warm-up over the first 10% of `steps` to `peak`, then cosine
    decay to 10% of `peak`: the schedule shape used for every optimizer."""
    warmup = max(1, steps // 10)
    return keras.optimizers.schedules.CosineDecay(
        0.0,
        max(1, steps - warmup),
        alpha=0.1,
        warmup_target=peak,
        warmup_steps=warmup,
    )


def make_optimizer(name, steps, peak, **options):
    """Optimizer `name` on the shared schedule shape, peaking at `peak`."""
    return OPTIMIZERS[name](learning_rate=warmup_cosine(peak, steps), **options)


def pydoc_bytes():
    """CPython's documentation as bytes (`pydoc_data`, in every Python)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics))
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def text_windows(sequence_length, train_count, validation_count, seed):
    """Next-byte prediction pairs `(x, y)` from the pydoc text: random
    windows of the first 90% for training, in an order that `seed` draws,
    and of the last 10% for validation, the same for every seed and
    `train_count`, so that runs of several seeds are measured alike."""
    data = pydoc_bytes()
    split = int(0.9 * len(data))

    def windows(part, count, seed, stream):
        rng = np.random.default_rng([seed, stream])
        starts = rng.integers(0, len(part) - sequence_length - 1, size=count)
        rows = part[starts[:, None] + np.arange(sequence_length + 1)]
        return rows[:, :-1].astype("int32"), rows[:, 1:].astype("int32")

    train = windows(data[:split], train_count, seed, 0)
    return train, windows(data[split:], validation_count, 0, 1)


def evaluation_interval(steps, evaluations=12):
    """The largest divisor of `steps` that gives at least `evaluations`
    validation passes (or one per step)."""
    return next(d for d in range(max(1, steps // evaluations), 0, -1) if steps % d == 0)


def fit_curves(
    model, train, validation, steps, batch_size, eval_every, verbose="auto", callbacks=()
):
    """Trains `model` (already compiled) for `steps` batches of `train`, in
    order, and evaluates it on `validation` every `eval_every` steps (None:
    `evaluation_interval(steps)`). `train` and `validation` are `(x, y)`
    arrays, batched by `batch_size` (256 for validation), or `tf.data`
    pipelines of batches. `callbacks` go to `fit`.

    Returns a dict of lists: `step`, the validation metrics (`val_loss`, ...)
    at step 0 and after every `eval_every` steps, the mean training `loss`
    of each interval (`None` at step 0), and `seconds`: the wall time of
    `fit`, including compilation and the validation passes.
    """
    if eval_every is None:
        eval_every = evaluation_interval(steps)
    if steps % eval_every:
        raise ValueError(f"steps ({steps}) must be a multiple of eval_every ({eval_every}).")
    # Arrays `(x, y)`, batched here; or `tf.data` pipelines, batched already.
    arrays = isinstance(train, tuple)
    initial = model.evaluate(
        *(validation if arrays else (validation,)),
        batch_size=256 if arrays else None,
        verbose=0,
        return_dict=True,
    )
    start = time.perf_counter()
    # Each Keras "epoch" is one evaluation interval; with steps_per_epoch
    # set, the next epoch continues from the next batch of `train`.
    history = model.fit(
        *(train if arrays else (train,)),
        batch_size=batch_size if arrays else None,
        epochs=steps // eval_every,
        steps_per_epoch=eval_every,
        shuffle=False,
        validation_data=validation,
        validation_batch_size=256 if arrays else None,
        verbose=verbose,
        callbacks=list(callbacks),
    ).history
    curves = {"step": list(range(0, steps + 1, eval_every)), "loss": [None] + history["loss"]}
    for metric, value in initial.items():
        curves[f"val_{metric}"] = [value] + history[f"val_{metric}"]
    curves["seconds"] = time.perf_counter() - start
    return curves


def compiled_model(
    name, peak, build_model, weights, steps, compile_args=None, options=None, show_routes=True
):
    """`build_model()` from `weights`, compiled with optimizer `name`
    (arguments `options`) on the shared schedule over `steps` peaking at
    `peak`. Prints keras_muon's routing table if `show_routes`."""
    model = build_model()
    model.set_weights(weights)
    optimizer = make_optimizer(name, steps, peak, **(options or {}))
    model.compile(optimizer=optimizer, **(compile_args or {}))
    if isinstance(optimizer, keras_muon.Muon) and show_routes:
        optimizer.attach(model)
        optimizer.build(model.trainable_variables)
        optimizer.summary()
    return model


def train(
    name,
    peak,
    build_model,
    weights,
    data,
    steps,
    batch_size,
    eval_every=None,
    compile_args=None,
    options=None,
    verbose="auto",
    show_routes=True,
    callbacks=(),
):
    """One run: `compiled_model(...)` trained on `data = (train,
    validation)` by `fit_curves`. Returns the curves."""
    model = compiled_model(
        name, peak, build_model, weights, steps, compile_args, options, show_routes
    )
    return fit_curves(model, *data, steps, batch_size, eval_every, verbose, callbacks)


def compare(args, stem, title, train_one, columns, plot_metrics):
    """Runs `train_one(name, peak)` for every optimizer of `args.optimizers`
    (by default COMPARED) at its peak learning rate (`args.learning_rate`
    or its default), prints a table of the final value of each metric in
    `columns` ({label: metric}) and the wall time, and writes the curves to
    `args.output`. Returns the table's rows."""
    runs, rows = {}, []
    for name in args.optimizers or COMPARED:
        peak = peak_learning_rate(name, args.learning_rate)
        print(f"\n{name}, peak learning rate {peak}")
        runs[name] = curves = train_one(name, peak)
        rows.append(
            {
                "optimizer": name,
                "peak lr": peak,
                **{label: curves[metric][-1] for label, metric in columns.items()},
                "fit seconds": curves["seconds"],
            }
        )
    title = f"{title}, backend {keras.backend.backend()}"
    print_table(title, rows)
    save_json(args.output, stem, runs)
    print(f"\nplot: {plot_curves(args.output, stem, title, runs, plot_metrics)}")
    return rows


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def argument_parser(description, steps=None, epochs=None, output="results", learning_rate=True):
    """A parser with the flags every example has."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if steps is not None:
        parser.add_argument(
            "--steps",
            type=positive_int,
            default=steps,
            help=f"training steps per optimizer (default {steps})",
        )
    if epochs is not None:
        parser.add_argument(
            "--epochs",
            type=positive_int,
            default=epochs,
            help=f"passes over the training set per optimizer (default {epochs})",
        )
    if learning_rate:
        parser.add_argument(
            "--learning-rate",
            type=float,
            default=None,
            help="one peak learning rate for every optimizer (default: each "
            "optimizer's own default learning rate)",
        )
        parser.add_argument(
            "--optimizer",
            dest="optimizers",
            action="append",
            choices=list(OPTIMIZERS),
            metavar="NAME",
            help="an optimizer to run, repeatable (default: "
            f"{', '.join(COMPARED)}); one of: {'; '.join(OPTIMIZERS)}",
        )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights and of the data order, the same "
        "for every optimizer (default 0)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(output),
        help=f"folder for the plot and the curves as JSON (default ./{output})",
    )
    return parser


def add_text_model_flags(parser):
    """Flags of the byte-level language models and their data."""
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="sequences per step (default 32)"
    )
    parser.add_argument(
        "--sequence-length", type=positive_int, default=64, help="bytes per sequence (default 64)"
    )
    parser.add_argument("--width", type=positive_int, default=128, help="model width (default 128)")
    parser.add_argument(
        "--depth", type=positive_int, default=2, help="transformer blocks (default 2)"
    )
    parser.add_argument("--heads", type=positive_int, default=4, help="attention heads (default 4)")
    parser.add_argument(
        "--fused",
        choices=("whole", "parts"),
        help="fused q|k|v and gate|up kernels, orthogonalized whole or as their parts "
        "(default: separate projections)",
    )
    parser.add_argument(
        "--eval-every",
        type=positive_int,
        default=None,
        help="steps between validation passes; must divide --steps "
        "(default: about a twelfth of --steps)",
    )
    parser.add_argument(
        "--validation-size",
        type=positive_int,
        default=512,
        help="validation sequences, from the last 10%% of the text (default 512)",
    )


def print_table(title, rows):
    """Prints `rows` (a list of dicts with the same keys) under `title`."""
    columns = list(rows[0])
    cells = [[_cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))
        )
    )
    for row in cells:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            )
        )


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def save_json(output, stem, data):
    """Writes `data` to `<output>/<stem>.json`."""
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{stem}.json").write_text(json.dumps(data, indent=1))


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


_LABELS = {
    "loss": "training loss (mean of each interval)",
    "val_loss": "validation loss",
    "val_accuracy": "validation accuracy",
}


def plot_curves(output, stem, title, runs, metrics):
    """Plots each metric of `runs` ({label: curves}) against the step, one
    panel per metric, to `<output>/<stem>.png`; returns the path."""
    plt = pyplot()
    output.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for label, curves in runs.items():
            points = [(x, y) for x, y in zip(curves["step"], curves[metric]) if y is not None]
            axis.plot(*zip(*points), label=label, marker="." if len(points) < 40 else None)
        axis.set_xlabel("step")
        axis.set_ylabel(_LABELS.get(metric, metric))
        axis.grid(alpha=0.3)
        if "loss" in metric:
            zoom_on_tail(axis, [curves[metric] for curves in runs.values()])
    axes[0][0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    path = output / f"{stem}.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def zoom_on_tail(axis, curves):
    """Leaves out the loss at step 0, which would flatten the rest."""
    values = [v for curve in curves for v in curve[1:] if v is not None and np.isfinite(v)]
    if len(values) > 1:
        low, high = min(values), max(values)
        axis.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
