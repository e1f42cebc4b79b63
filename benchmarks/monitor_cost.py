"""What `keras_muon.MuonMonitor` costs: the train step of the char
transformer of examples/char_transformer.py with keras_muon.Muon under
`fit`, without the monitor, with it every 10 steps and with it every
step (Newton–Schulz's singular values every 100 steps in both), measured
alternately in one process on one compiled model.

Each round trains `--steps` steps per setting with `fit`. Per setting,
the table gives the median over rounds of `fit`'s wall time per step and
of the time per step spent in the monitor's hooks, where it copies,
syncs JAX's state and measures: on a shared machine whose load moves
the step time by more than the monitor costs, the second still resolves
that cost. Each setting keeps one monitor for all its rounds, as a long run
would, its steps counted on from one `fit` to the next: with 100 steps a
round, every round measures as many steps and one singular-value step,
and the singular values of the first measured step, which a long run
measures once, fall in the first round. That round, not counted, also
compiles the train step and the monitor's reductions (on JAX, each eager
operation compiles once per shape; on TensorFlow, the copy and the
reductions are traced once).

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


class TimedMonitor(keras_muon.MuonMonitor):
    """A `MuonMonitor` that adds up the wall time of the hooks where it
    copies and measures (the batch end, which only copies the last values
    into the logs, is left out: Keras may run it in a thread)."""

    seconds = 0.0

    def _timed(self, hook, *args):
        if self._pending is not None or self._measures(self._step):
            # The hook copies or measures, so it waits for the steps still
            # running (JAX's run asynchronously, several steps ahead): wait
            # before the clock starts, so that it counts the monitor's own
            # work, not the training's.
            _wait_for_steps(self.model)
        start = time.perf_counter()
        hook(*args)
        self.seconds += time.perf_counter() - start

    def on_train_batch_begin(self, batch, logs=None):
        self._timed(super().on_train_batch_begin, batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._timed(super().on_epoch_end, epoch, logs)

    def on_train_end(self, logs=None):
        self._timed(super().on_train_end, logs)


def _wait_for_steps(model):
    # JAX's `fit` keeps the training state in `_jax_state` for callbacks.
    state = getattr(model, "_jax_state", None)
    if state is not None:
        import jax

        jax.block_until_ready(state)


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
    monitor_times = {name: [] for name in SETTINGS}  # in the monitor's hooks
    callbacks = {
        name: [] if options is None else [TimedMonitor(**options)]
        for name, options in SETTINGS.items()
    }
    # The first round compiles the train step and the monitor's reductions.
    for round in range(args.rounds + 1):
        for name in SETTINGS:
            monitored = sum(c.seconds for c in callbacks[name])
            start = time.perf_counter()
            model.fit(x, y, batch_size=args.batch_size, verbose=0, callbacks=callbacks[name])
            if round:
                times[name].append((time.perf_counter() - start) / args.steps)
                monitored = sum(c.seconds for c in callbacks[name]) - monitored
                monitor_times[name].append(monitored / args.steps)
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
                "in monitor ms": 1000 * statistics.median(monitor_times[name]),
                "÷ no-monitor step": statistics.median(monitor_times[name]) / plain,
            }
            for name, t in times.items()
        ],
    )
    return times


if __name__ == "__main__":
    main()
