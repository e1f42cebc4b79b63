"""Training quality at tens of millions of parameters: keras.optimizers.AdamW,
keras_muon.Muon, keras_muon.NorMuon and MuonH (keras_muon.Muon with
hyperball=True) on a GPT-style byte-level decoder, each over a small
learning-rate grid fixed before any run at this scale.

Model: keras-hub's GPT2CausalLM on a GPT2Backbone built from a config
(`examples/keras_hub_gpt2.py`; random initialisation, no preset, nothing
downloaded) over the 256 byte values: learned positions, pre-norm blocks,
a 4·width feed-forward layer, the token embedding tied to the LM head. The
defaults, 8 blocks of width 512 with 8 heads of 64 over 512 bytes, have
25.6M parameters (the script prints the count of the configuration it
builds).

Data: the `.py` files of CPython's standard library, the folder
`sysconfig.get_paths()["stdlib"]` with any site-packages left out, read
as bytes (about 31 MB in Python 3.11). A file is held out for validation,
whole, when the CRC-32 of its path relative to that folder is 0 modulo 10:
about a tenth of the modules, the same ones on every machine with the same
Python version. Training batches are windows at random offsets of the
training files joined in path order; validation is a fixed sample of
windows of the held-out files.

Training: Keras's "mixed_bfloat16" policy (float32 weights and optimizer
state), the schedule shape of every benchmark here (10% linear warm-up,
then cosine decay to 10% of the peak; `common.warmup_cosine`), no gradient
clipping. Every run starts from the same initial weights and sees the
same batches in the same order. AdamW takes the GPT-2 recipe, β₂ = 0.95
and weight decay 0.1 (Keras's defaults are 0.999 and 0.004); the Muon
variants take keras_muon's defaults (weight decay 0.1 on Muon's matrices;
none under Hyperball, whose fixed norm replaces it).

Learning-rate grids, fixed in advance (GRIDS):
- AdamW 1e-3, 2e-3, 4e-3. Its best on the ~1M-parameter CPU benchmark
  (benchmarks/quality.py, width 128) was 8e-3; Adam's best learning rate
  falls about as 1/width for the hidden matrices, which puts it near 2e-3
  at width 512, and published GPT-style runs use 6e-4 at 125M parameters
  and 1e-3 at 70M. Three values, so that the baseline is tuned: an AdamW
  off its best would flatter Muon.
- Muon 4e-3, 8e-3, 1.6e-2. With the "moonlight" scale (update RMS 0.2, as
  AdamW's) its best on the CPU benchmark was 1.6e-2; an update of
  spectral norm 0.2·sqrt(width)·lr transfers across widths when lr falls
  as 1/sqrt(width), which puts it near 8e-3 at width 512, and
  modded-nanogpt's Muon learning rates of 0.02–0.05 under Keller Jordan's
  scale are 4e-3 to 9e-3 in these units at width 768.
- NorMuon 8e-3, 1.6e-2: the same update RMS as Muon, and the same CPU
  best; two values, where a best below 8e-3 would only count against it.
- MuonH 1.6e-2, 3.2e-2. Its learning rate is the fraction of each
  matrix's norm moved per step, whatever the width; on the CPU benchmark
  its best of 4e-3..6.4e-2 was 3.2e-2, then 1.6e-2 (docs/scale.md), and
  published MuonH runs use about 0.018.

Sizing: `--time-budget SECONDS` (counted from the start of `main`, after
the imports) times MuonH on the real model and batch: its compilation,
10 steps and a validation pass (MuonH and NorMuon compile and step the
slowest of the four on a CPU; AdamW the fastest). It then sets `--steps`
to the largest multiple of 20 for which every run, planned at that cost,
fits in 90% of what is left of the budget; `--plan` stops after printing
the plan. The model and the batch are fixed by the flags; without a
budget, the default 800 steps are an estimate of what fits in about 8
minutes on one H200 (docs/scale.md says how it was sized).

Prints the parameter count, the plan, a table of final validation loss
per optimizer and learning rate, and for each optimizer's best run the
tokens it needs to reach AdamW's best final validation loss, as a
fraction of AdamW's (first crossing of the validation curve, linearly
interpolated between evaluations: `quality.steps_to_reach`). Writes every
curve and setting to <output>/scale_quality.json (after each run, so an
interrupted run keeps what it finished) and a plot to
<output>/scale_quality.png.

    KERAS_BACKEND=jax python benchmarks/scale_quality.py --time-budget 450
    KERAS_BACKEND=jax python benchmarks/scale_quality.py --tiny    # the plumbing, on a CPU
"""

import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import common
import keras_hub_gpt2
import quality

ADAMW = quality.ADAMW
MUON = quality.MUON
NORMUON = "keras_muon.NorMuon"
MUONH = "keras_muon.Muon hyperball=True"
GRIDS = {
    ADAMW: (1e-3, 2e-3, 4e-3),
    MUON: (4e-3, 8e-3, 1.6e-2),
    NORMUON: (8e-3, 1.6e-2),
    MUONH: (1.6e-2, 3.2e-2),
}
OPTIONS = {ADAMW: {"beta_2": 0.95, "weight_decay": 0.1}}
PROBED = MUONH
EVALUATIONS = 20  # validation passes per run; a planned --steps is a multiple
PROBE_STEPS = 10
MARGIN = 0.9  # of the time left, what the plan fills
STEPS = 800
TINY = {
    "layers": 2,
    "width": 64,
    "heads": 4,
    "seq_len": 64,
    "batch": 8,
    "steps": 40,
    "validation_size": 32,
}
COMPILE_ARGS = {
    "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    "weighted_metrics": [],
}


def stdlib_bytes():
    """The training and the held-out text of CPython's standard library, as
    uint8 arrays, and how many files each holds."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = {False: [], True: []}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        # Installed packages differ between machines; the standard library does not.
        if {"site-packages", "dist-packages"} & set(relative.parts):
            continue
        held_out = zlib.crc32(relative.as_posix().encode()) % 10 == 0
        parts[held_out].append(path.read_bytes())
    return [
        (np.frombuffer(b"".join(files), np.uint8), len(files))
        for files in (parts[False], parts[True])
    ]


def windows(text, count, length, stream, seed):
    """`count` next-byte pairs `(x, y)` of `length` bytes at random offsets
    of `text`, drawn from the random stream `(seed, stream)`, in GPT2CausalLM's
    input format."""
    starts = np.random.default_rng([seed, stream]).integers(0, len(text) - length, size=count)
    rows = text[starts[:, None] + np.arange(length + 1)]
    return keras_hub_gpt2.with_padding_mask(
        (rows[:, :-1].astype("int32"), rows[:, 1:].astype("int32"))
    )


def parse(argv):
    parser = common.argument_parser(__doc__, steps=STEPS, learning_rate=False)
    positive = common.positive_int
    parser.add_argument("--layers", type=positive, default=8, help="transformer blocks (default 8)")
    parser.add_argument("--width", type=positive, default=512, help="model width (default 512)")
    parser.add_argument("--heads", type=positive, default=8, help="attention heads (default 8)")
    parser.add_argument(
        "--seq-len", type=positive, default=512, help="bytes per sequence (default 512)"
    )
    parser.add_argument(
        "--batch", type=positive, default=64, help="sequences per step (default 64)"
    )
    parser.add_argument(
        "--eval-every",
        type=positive,
        default=None,
        help=f"steps between validation passes; must divide --steps (default: --steps/{EVALUATIONS}, "
        "or the largest divisor that gives at least that many passes)",
    )
    parser.add_argument(
        "--validation-size",
        type=positive,
        default=256,
        help="validation sequences, from the held-out modules (default 256)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(GRIDS),
        default=list(GRIDS),
        metavar="NAME",
        help=f"optimizers to run, each over its grid (default all): {'; '.join(GRIDS)}",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="wall-clock seconds for everything after the imports: time a few steps, "
        "then set --steps to what fits",
    )
    parser.add_argument(
        "--plan", action="store_true", help="stop after printing the --time-budget plan"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="small defaults for a CPU check: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in TINY.items()),
    )
    args, _ = parser.parse_known_args(argv)
    if args.tiny:
        parser.set_defaults(**TINY)
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        parser.error("runs on the JAX backend: set KERAS_BACKEND=jax")
    if args.width % args.heads:
        parser.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads})")
    if args.time_budget is not None and args.eval_every is not None:
        parser.error("--time-budget sets --steps, and --eval-every to a twentieth of it")
    if args.plan and args.time_budget is None:
        parser.error("--plan prints the plan for --time-budget: give one")
    return args


def measure(args, build_model, weights, validation, train):
    """Seconds of one training step (the mean of PROBE_STEPS after the
    first), of one validation pass, and of the rest of a run (building,
    compiling), timed on PROBED with the real model and batch."""
    start = time.perf_counter()
    model = common.compiled_model(
        PROBED,
        GRIDS[PROBED][0],
        build_model,
        weights,
        args.steps,
        COMPILE_ARGS,
        show_routes=False,
    )
    (x, y), batch = train, args.batch
    batches = [
        (
            {k: v[i * batch : (i + 1) * batch] for k, v in x.items()},
            y[i * batch : (i + 1) * batch],
        )
        for i in range(PROBE_STEPS + 1)
    ]
    model.train_on_batch(*batches[0])
    steady = time.perf_counter()
    for pair in batches[1:]:
        model.train_on_batch(*pair)
    step = (time.perf_counter() - steady) / PROBE_STEPS
    model.evaluate(*validation, batch_size=256, verbose=0)
    again = time.perf_counter()
    model.evaluate(*validation, batch_size=256, verbose=0)
    evaluation = time.perf_counter() - again
    overhead = again - start - (PROBE_STEPS + 1) * step - evaluation
    return step, evaluation, overhead


def plan(args, runs, elapsed, step, evaluation, overhead):
    """The steps, a multiple of EVALUATIONS, whose `runs` planned runs fit
    in MARGIN of the budget left after `elapsed` seconds."""
    per_run = MARGIN * (args.time_budget - elapsed) / runs
    steps = (
        int((per_run - overhead - (EVALUATIONS + 1) * evaluation) / step)
        // EVALUATIONS
        * EVALUATIONS
    )
    rows = [
        {"measured": "one training step", "seconds": step},
        {"measured": "one validation pass", "seconds": evaluation},
        {"measured": "building and compiling one run", "seconds": overhead},
        {"measured": "spent so far (data, weights, this timing)", "seconds": elapsed},
    ]
    common.print_table(f"timing of {PROBED}, {args.batch}×{args.seq_len} bytes per step", rows)
    if steps < EVALUATIONS:
        raise SystemExit(
            f"{runs} runs do not fit in --time-budget {args.time_budget:g} s: each needs "
            f"{overhead + (EVALUATIONS + 1) * evaluation + EVALUATIONS * step:.0f} s for "
            f"{EVALUATIONS} steps; give more time, fewer --optimizers or a smaller model"
        )
    planned = overhead + (EVALUATIONS + 1) * evaluation + steps * step
    print(
        f"\nplan: {runs} runs of {steps} steps ({steps * args.batch * args.seq_len / 1e6:.1f}M tokens), "
        f"{planned:.0f} s each, {elapsed + runs * planned:.0f} s of the {args.time_budget:g} s budget"
    )
    return {"rows": rows, "steps": steps, "seconds per run": planned}


def main(argv=None):
    started = time.perf_counter()
    args = parse(argv)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        return run(args, started)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def run(args, started):
    (train_text, train_files), (held_out_text, held_out_files) = stdlib_bytes()
    validation = windows(held_out_text, args.validation_size, args.seq_len, 1, args.seed)

    def build_model():
        return keras_hub_gpt2.gpt2(args.seq_len, args.width, args.layers, args.heads)

    keras.utils.set_random_seed(args.seed)
    model = build_model()
    weights, parameters = model.get_weights(), model.count_params()
    print(
        f"GPT2CausalLM: {args.layers} blocks, width {args.width}, {args.heads} heads, "
        f"{args.seq_len} bytes: {parameters:,} parameters\n"
        f"CPython {platform.python_version()} standard library: {train_files} files "
        f"({len(train_text) / 1e6:.1f} MB) for training, {held_out_files} held out "
        f"({len(held_out_text) / 1e6:.1f} MB)",
        flush=True,
    )
    runs_planned = sum(len(GRIDS[name]) for name in args.optimizers)
    timing = None
    if args.time_budget is not None:
        probe = windows(train_text, (PROBE_STEPS + 1) * args.batch, args.seq_len, 2, args.seed)
        measured = measure(args, build_model, weights, validation, probe)
        timing = plan(args, runs_planned, time.perf_counter() - started, *measured)
        if args.plan:
            return timing
        args.steps = timing["steps"]
    eval_every = args.eval_every or common.evaluation_interval(args.steps, EVALUATIONS)
    if args.steps % eval_every:
        raise SystemExit(f"--eval-every ({eval_every}) must divide --steps ({args.steps})")
    data = (
        windows(train_text, args.steps * args.batch, args.seq_len, 0, args.seed),
        validation,
    )
    tokens_per_step = args.batch * args.seq_len

    import jax  # here: on another backend, parse's message comes first

    setting = {
        "backend": keras.backend.backend(),
        "device": jax.devices()[0].device_kind,
        "keras": keras.__version__,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "parameters": parameters,
        **{name: getattr(args, name) for name in ("layers", "width", "heads", "seq_len", "batch")},
        "steps": args.steps,
        "eval_every": eval_every,
        "tokens per run": args.steps * tokens_per_step,
        "training files": train_files,
        "training bytes": len(train_text),
        "held-out files": held_out_files,
        "held-out bytes": len(held_out_text),
        "seed": args.seed,
        "grids": {name: GRIDS[name] for name in args.optimizers},
        "options": OPTIONS,
        "plan": timing,
    }
    runs = []
    for name in args.optimizers:
        for peak in GRIDS[name]:
            print(f"{name} at peak learning rate {peak:g}", flush=True)
            start = time.perf_counter()
            curves = common.train(
                name,
                peak,
                build_model,
                weights,
                data,
                args.steps,
                args.batch,
                eval_every,
                COMPILE_ARGS,
                OPTIONS.get(name),
                verbose=0,
                show_routes=False,
            )
            curves["tokens"] = [step * tokens_per_step for step in curves["step"]]
            curves["run seconds"] = time.perf_counter() - start
            runs.append({"optimizer": name, "learning_rate": peak, **curves})
            print(
                f"  validation loss {curves['val_loss'][-1]:.4f}, {curves['run seconds']:.1f} s",
                flush=True,
            )
            common.save_json(args.output, "scale_quality", {"setting": setting, "runs": runs})
    return report(args, setting, runs)


def report(args, setting, runs):
    """Prints the tables, writes the JSON and the plot; returns the summary."""
    best = {
        name: min(
            (run for run in runs if run["optimizer"] == name),
            key=lambda run: np.nan_to_num(run["val_loss"][-1], nan=np.inf),
        )
        for name in args.optimizers
    }
    grid = [
        {
            "optimizer": run["optimizer"],
            "peak lr": run["learning_rate"],
            "final validation loss": run["val_loss"][-1],
            "run seconds": run["run seconds"],
        }
        for run in runs
    ]
    summary = []
    for name, run in best.items():
        row = {
            "optimizer": name,
            "best lr": run["learning_rate"],
            "final validation loss": run["val_loss"][-1],
        }
        if ADAMW in best:
            target = best[ADAMW]["val_loss"][-1]
            reached, adamw = (quality.steps_to_reach(r, target) for r in (run, best[ADAMW]))
            tokens = None if reached is None else reached * setting["batch"] * setting["seq_len"]
            row["tokens to AdamW's best (M)"] = "never" if tokens is None else tokens / 1e6
            row["fraction of AdamW's tokens"] = "-" if reached is None else reached / adamw
        summary.append(row)
    title = (
        f"{setting['parameters'] / 1e6:.1f}M-parameter GPT2CausalLM, {setting['steps']} steps of "
        f"{setting['batch']}×{setting['seq_len']} bytes ({setting['tokens per run'] / 1e6:.1f}M tokens), "
        f"{setting['device']}"
    )
    common.print_table(f"final validation loss per peak learning rate ({title})", grid)
    common.print_table("best run of each", summary)
    # A two-value grid always has its best at an edge: only longer ones say so.
    edge = [
        name
        for name, run in best.items()
        if len(GRIDS[name]) > 2 and run["learning_rate"] in (min(GRIDS[name]), max(GRIDS[name]))
    ]
    if edge:
        print(f"note: the best learning rate is at the edge of the grid for {', '.join(edge)}")
    common.save_json(
        args.output,
        "scale_quality",
        {"setting": setting, "runs": runs, "summary": summary},
    )
    print(f"\nplot: {plot(args.output, title, runs, best)}")
    return summary


def plot(output, title, runs, best):
    """Validation curves of each optimizer's best run against tokens, and
    final losses over the grids, to `<output>/scale_quality.png`."""
    pyplot = common.pyplot()
    figure, (curves_axis, grid_axis) = pyplot.subplots(1, 2, figsize=(11, 4))
    for name, run in best.items():
        tokens = [count / 1e6 for count in run["tokens"]]
        curves_axis.plot(tokens, run["val_loss"], label=f"{name} (lr {run['learning_rate']:g})")
        points = [(r["learning_rate"], r["val_loss"][-1]) for r in runs if r["optimizer"] == name]
        grid_axis.plot(*zip(*points), marker="o", label=name)
    curves_axis.set(
        xlabel="training tokens (millions)",
        ylabel="validation loss",
        title="best learning rate of each",
    )
    grid_axis.set(
        xlabel="peak learning rate",
        ylabel="final validation loss",
        xscale="log",
        title="learning-rate grids",
    )
    # zoom_on_tail leaves out each curve's first value (the loss at step 0).
    finals = [run["val_loss"][-1] for run in runs]
    for axis, curves in (
        (curves_axis, [run["val_loss"] for run in best.values()]),
        (grid_axis, [[None, *finals]]),
    ):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        common.zoom_on_tail(axis, curves)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = output / "scale_quality.png"
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


if __name__ == "__main__":
    main()
