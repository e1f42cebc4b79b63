"""What recording the attention logits costs: the train step of the
byte-level transformer with keras_muon.Muon, without and with QK-Clip
(a threshold no logit reaches, so only the recording differs), measured
alternately in one process.

    KERAS_BACKEND=jax python benchmarks/qk_clip_cost.py
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


def step_times(threshold, args, tokens, repeats):
    keras.utils.set_random_seed(0)
    model = char_transformer(args.sequence_length, args.width, args.depth, args.heads)
    model.compile(
        optimizer=keras_muon.Muon(qk_clip_threshold=threshold),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = tokens[:, :-1], tokens[:, 1:]
    model.train_on_batch(x, y)  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (args.batch_size, args.sequence_length + 1)).astype("int32")
    runs = {"Muon": None, "Muon + QK-Clip": 1e30}
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, threshold in runs.items():
            times[name] += step_times(threshold, args, tokens, args.repeats)
    plain = statistics.median(times["Muon"])
    logits = args.batch_size * args.heads * args.sequence_length**2
    print(
        f"{keras.backend.backend()}, {args.depth} blocks, width {args.width}, "
        f"{args.batch_size}×{args.sequence_length} tokens; median of "
        f"{args.rounds}×{args.repeats} steps"
    )
    print("| run | train step (ms) | ratio |")
    print("|---|---|---|")
    for name in runs:
        median = statistics.median(times[name])
        print(f"| {name} | {1000 * median:.1f} | {median / plain:.3f} |")
    print(
        f"recorded logits per layer: {logits:,} float32 "
        f"({4 * logits / 2**20:.2f} MiB, transient), {args.depth} layers"
    )


if __name__ == "__main__":
    main()
