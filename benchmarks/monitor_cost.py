"""What `keras_muon.MuonMonitor` costs: the train step of the char
transformer of examples/char_transformer.py with keras_muon.Muon under
`fit`, without the monitor, with it every 10 steps and with it every
step (Newton–Schulz's singular values every 100 steps in both), measured
alternately in one process on one compiled model.

Each round trains `--steps` steps per setting with `fit` (a fresh monitor
each time, so each round measures the same steps); the step time is the
wall time of that `fit` divided by its steps, the median over rounds. A
first round, not counted, compiles the train step and the monitor's
reductions (on JAX, each eager operation compiles once per shape).

    KERAS_BACKEND=jax python benchmarks/monitor_cost.py
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import keras_muon  # noqa: E402
from char_transformer import char_transformer  # noqa: E402
from common import add_text_model_flags  # noqa: E402
from common import positive_int  # noqa: E402
from common import print_table  # noqa: E402

# setting: the monitor's arguments, or None for no monitor
SETTINGS = {
    "no monitor": None,
    "MuonMonitor(every=10)": {"every": 10},
    "MuonMonitor(every=1)": {"every": 1},
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_text_model_flags(parser)
    parser.add_argument(
        "--steps", type=positive_int, default=100, help="steps per fit (default 100)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=5, help="fits per setting (default 5)"
    )
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    model = char_transformer(args.sequence_length, args.width, args.depth, args.heads)
    model.compile(
        optimizer=keras_muon.Muon(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (args.steps * args.batch_size, args.sequence_length + 1))
    x, y = tokens[:, :-1].astype("int32"), tokens[:, 1:].astype("int32")
    times = {name: [] for name in SETTINGS}
    # The first round compiles the train step and the monitor's reductions.
    for round in range(args.rounds + 1):
        for name, options in SETTINGS.items():
            callbacks = [] if options is None else [keras_muon.MuonMonitor(**options)]
            start = time.perf_counter()
            model.fit(x, y, batch_size=args.batch_size, verbose=0, callbacks=callbacks)
            if round:
                times[name].append((time.perf_counter() - start) / args.steps)
    plain = statistics.median(times["no monitor"])
    print_table(
        f"{keras.backend.backend()}, {args.depth} blocks, width {args.width}, "
        f"{args.batch_size}×{args.sequence_length} tokens; median of {args.rounds} fits of "
        f"{args.steps} steps",
        [
            {
                "setting": name,
                "step ms": 1000 * statistics.median(t),
                "× no monitor": statistics.median(t) / plain,
            }
            for name, t in times.items()
        ],
    )
    return times


if __name__ == "__main__":
    main()
