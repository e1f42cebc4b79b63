"""Training quality: keras_muon's optimizers (Muon, with cautious weight
decay, NorMuon, AdaMuon), keras.optimizers.AdamW and keras.optimizers.Muon
on the char transformer of examples/char_transformer.py, each over the same
learning-rate grid and the same schedule shape.

Every run starts from the same initial weights and sees the same batches.
Prints the final validation loss of every run, the best per optimizer, and
the steps each needs to reach AdamW's best final validation loss as a
fraction of the steps AdamW needs (first crossing of the validation
curve, linearly interpolated between evaluations). Writes every curve to
<output>/quality.json and a plot to <output>/quality.png.

With `--seeds N`, the grid runs on the first seed (`--seed`), and each
optimizer then runs at the learning rate it did best at there on N − 1
more seeds, each with other initial weights and another batch order (the
validation windows stay the same). The table gives, over the N seeds, the
mean ± standard deviation of the final validation loss and of the steps
to reach AdamW's mean, and each optimizer against AdamW and against
keras_muon.Muon under the rule of examples/spread.py: better or worse
where Welch's t-test gives p < 0.01, otherwise within noise.

    KERAS_BACKEND=jax python benchmarks/quality.py [--seeds 5]
"""

import argparse
import ast
import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import char_transformer  # noqa: E402
import common  # noqa: E402
import spread  # noqa: E402

MUON = "keras_muon.Muon"
ADAMW = "keras.optimizers.AdamW"
STEPS = 600
LEARNING_RATES = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)


def steps_to_reach(curves, target):
    """First step at which the validation loss is <= `target`, linearly
    interpolated between evaluations; None if it never gets there."""
    steps, losses = curves["step"], curves["val_loss"]
    for i in range(1, len(steps)):
        if losses[i] <= target:
            before, after = losses[i - 1], losses[i]
            fraction = 1.0 if before == after else (before - target) / (before - after)
            return steps[i - 1] + min(1.0, fraction) * (steps[i] - steps[i - 1])
    return None


def option(text):
    """Parses `--muon-option name=value` (value as a Python literal)."""
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main(argv=None):
    parser = common.argument_parser(__doc__, steps=STEPS, learning_rate=False)
    common.add_text_model_flags(parser)
    parser.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=LEARNING_RATES,
        help="peak learning rates, the same grid for every optimizer "
        f"(default {' '.join(map(str, LEARNING_RATES))})",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(common.OPTIMIZERS),
        metavar="NAME",
        default=list(common.OPTIMIZERS),
        help=f"optimizers to run (default all): {'; '.join(common.OPTIMIZERS)}",
    )
    parser.add_argument(
        "--seeds",
        type=common.positive_int,
        default=1,
        help="seeds per optimizer: the grid on the first, then its best learning "
        "rate on the others (default 1)",
    )
    parser.add_argument(
        "--muon-option",
        type=option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an argument of keras_muon.Muon other than learning_rate, for "
        "ablations, e.g. --muon-option weight_decay=0.1 (repeatable)",
    )
    args = parser.parse_args(argv)
    weights, data = char_transformer.initial_weights(args), char_transformer.text_data(args)
    muon_options = dict(args.muon_option)

    runs = [
        one_run(args, name, learning_rate, weights, data, muon_options)
        for learning_rate in args.learning_rates
        for name in args.optimizers
    ]

    final = {(run["optimizer"], run["learning_rate"]): run["val_loss"][-1] for run in runs}
    grid = [
        {"peak lr": lr, **{name: final[name, lr] for name in args.optimizers}}
        for lr in args.learning_rates
    ]
    best = {
        name: min(
            (run for run in runs if run["optimizer"] == name),
            key=lambda r: np.nan_to_num(r["val_loss"][-1], nan=np.inf),
        )
        for name in args.optimizers
    }
    summary = []
    for name, run in best.items():
        row = {
            "optimizer": name,
            "best lr": run["learning_rate"],
            "best validation loss": run["val_loss"][-1],
        }
        if ADAMW in best:
            target = best[ADAMW]["val_loss"][-1]
            reached = steps_to_reach(run, target)
            row["steps to AdamW's best"] = "never" if reached is None else round(reached)
            row["fraction of AdamW's steps"] = (
                "-" if reached is None else reached / steps_to_reach(best[ADAMW], target)
            )
        summary.append(row)

    backend = keras.backend.backend()
    setting = (
        f"backend {backend}, {args.steps} steps of {args.batch_size}×{args.sequence_length} bytes, "
        f"width {args.width}, depth {args.depth}, seed {args.seed}"
    )
    if muon_options:
        setting += f", keras_muon.Muon options {muon_options}"
    common.print_table(f"final validation loss per peak learning rate ({setting})", grid)
    common.print_table("best run per optimizer", summary)
    edge = [
        name
        for name, run in best.items()
        if run["learning_rate"] in (min(args.learning_rates), max(args.learning_rates))
    ]
    if edge:
        print(f"note: the best learning rate is at the edge of the grid for {', '.join(edge)}")
    seeded = {}
    if args.seeds > 1:
        seeded = over_seeds(args, best, muon_options)
        common.print_table(
            f"over seeds {args.seed}–{args.seed + args.seeds - 1}, each optimizer at its best "
            f"learning rate of seed {args.seed}; better or worse where Welch's p < {spread.ALPHA}",
            seeded_rows(seeded),
        )
    path = _plot(args.output, setting, runs, best, seeded)
    print(f"\nplot: {path}")
    return summary


def one_run(args, name, learning_rate, weights, data, muon_options):
    """Optimizer `name` trained from `weights` on `data` at peak
    `learning_rate`: its curves, with its name, learning rate and seed."""
    print(f"{name} at peak learning rate {learning_rate:g}, seed {args.seed}", flush=True)
    curves = common.train(
        name,
        learning_rate,
        char_transformer.model_builder(args),
        weights,
        data,
        args.steps,
        args.batch_size,
        args.eval_every,
        char_transformer.LOSS,
        muon_options if name == MUON else {},
        verbose=0,
        show_routes=False,
    )
    print(f"  validation loss {curves['val_loss'][-1]:.4f}, {curves['seconds']:.1f} s", flush=True)
    return {"optimizer": name, "learning_rate": learning_rate, "seed": args.seed, **curves}


def over_seeds(args, best, muon_options):
    """{optimizer: its runs at its best learning rate, one per seed}: the
    grid's run for the first seed, then a run for each other seed."""
    seeded = {name: [run] for name, run in best.items()}
    for seed in range(args.seed + 1, args.seed + args.seeds):
        seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
        weights = char_transformer.initial_weights(seed_args)
        data = char_transformer.text_data(seed_args)
        for name, runs in seeded.items():
            learning_rate = best[name]["learning_rate"]
            runs.append(one_run(seed_args, name, learning_rate, weights, data, muon_options))
    return seeded


def seeded_rows(seeded):
    """The table over seeds: per optimizer, its final validation loss and
    its steps to AdamW's mean final loss, and how it compares with AdamW
    and with keras_muon.Muon."""
    losses = {name: [run["val_loss"][-1] for run in runs] for name, runs in seeded.items()}
    target = spread.mean_sd(losses[ADAMW])[0] if ADAMW in losses else None
    rows = []
    for name, runs in seeded.items():
        row = {
            "optimizer": name,
            "lr": runs[0]["learning_rate"],
            "validation loss": spread.mean_sd_text(losses[name]),
        }
        if target is not None:
            reached = [steps_to_reach(run, target) for run in runs]
            reached = [steps for steps in reached if steps is not None]
            text = spread.mean_sd_text(reached, digits=0) if reached else "never"
            row["steps to AdamW's mean"] = f"{text} ({len(reached)}/{len(runs)})"
        for other in (ADAMW, MUON):
            if other in losses:
                verdict = "-" if other == name else spread.verdict(losses[name], losses[other])
                row[f"vs {other.rsplit('.', 1)[1]}"] = verdict
        rows.append(row)
    return rows


def _plot(output, setting, runs, best, seeded):
    more = [run for name_runs in seeded.values() for run in name_runs[1:]]
    common.save_json(
        output,
        "quality",
        {"setting": setting, "runs": runs, "seeded runs": more, "seeds": seeded_rows(seeded)}
        if seeded
        else {"setting": setting, "runs": runs},
    )
    pyplot = common.pyplot()
    figure, (curves_axis, grid_axis) = pyplot.subplots(1, 2, figsize=(11, 4))
    for name, run in best.items():
        curves_axis.plot(
            run["step"], run["val_loss"], label=f"{name} (lr {run['learning_rate']:g})"
        )
        points = [(r["learning_rate"], r["val_loss"][-1]) for r in runs if r["optimizer"] == name]
        grid_axis.plot(*zip(*points), marker="o", label=name)
    curves_axis.set(xlabel="step", ylabel="validation loss", title="best learning rate of each")
    grid_axis.set(
        xlabel="peak learning rate",
        ylabel="final validation loss",
        xscale="log",
        title="learning-rate grid",
    )
    for axis, values in (
        (curves_axis, [run["val_loss"] for run in best.values()]),
        (grid_axis, [[None] + [run["val_loss"][-1] for run in runs]]),
    ):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        common.zoom_on_tail(axis, values)
    figure.suptitle(setting, fontsize=9)
    figure.tight_layout()
    path = output / "quality.png"
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


if __name__ == "__main__":
    main()
