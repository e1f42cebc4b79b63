"""Train-step time of keras.optimizers.AdamW and keras_muon.Muon on one
device and under keras.distribution.DataParallel over all devices (JAX),
with the Newton–Schulz work split among the devices (keras_muon's default)
and not (`split_newton_schulz=False`).

The model is the char transformer of examples/char_transformer.py; the
global batch is split among the devices. Without accelerators, JAX
simulates `--devices` CPU devices, which share the machine's cores: work
that every device repeats shows as time. Per configuration, in one process,
interleaved round by round (medians of the rounds):

- train step: the wall time of `model.train_on_batch`;
- update GFLOP per device: the FLOPs one device executes in the compiled
  `optimizer.apply` (jax.jit of `stateless_apply` on the variables'
  shardings), from XLA's cost analysis of the partitioned program;
- NS GFLOP per device: Newton–Schulz's matrix products counted from the
  routing: all blocks on one device; split, `ceil(n / devices)` blocks of
  each group of `n` blocks of one shape (the rest is zero padding).

Prints the table and writes <output>/distributed_step_time.json.

    python benchmarks/distributed_step_time.py
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

from step_time import block_groups
from step_time import interleaved_medians
from step_time import machine
from step_time import positive_int
from step_time import versions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HEAD_SIZE = 64
NS_STEPS = 5
OPTIMIZERS = ("keras.optimizers.AdamW", "keras_muon.Muon", "keras_muon.Muon, unsplit")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=positive_int, default=8, help="simulated CPU devices without accelerators (default 8)")
    parser.add_argument("--width", type=positive_int, default=256, help="model width d (default 256)")
    parser.add_argument("--depth", type=positive_int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="global batch, sequences per step (default 32)")
    parser.add_argument("--sequence-length", type=positive_int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--rounds", type=positive_int, default=7, help="interleaved timing rounds (default 7)")
    parser.add_argument("--steps", type=positive_int, default=4, help="train steps per timed round (default 4)")
    parser.add_argument("--output", type=Path, default=Path("results"), help="folder for the JSON (default ./results)")
    args = parser.parse_args(argv)
    if args.width % HEAD_SIZE:
        parser.error(f"--width must be a multiple of the head size {HEAD_SIZE}")
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    result = measure(args)
    print_table(result)
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / "distributed_step_time.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")


def measure(args):
    import keras
    import numpy as np

    sys.path.insert(0, str(EXAMPLES))
    import char_transformer

    devices = keras.distribution.list_devices()
    if args.batch_size % len(devices):
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by {len(devices)} devices")
    placements = {
        "one device": keras.distribution.DataParallel(devices=devices[:1]),
        f"DataParallel, {len(devices)} devices": keras.distribution.DataParallel(devices=devices),
    }
    rng = np.random.default_rng(0)
    tokens = rng.integers(
        0, char_transformer.VOCABULARY, (args.batch_size * args.steps, args.sequence_length + 1)
    ).astype("int32")
    batches = [
        (tokens[i : i + args.batch_size, :-1], tokens[i : i + args.batch_size, 1:])
        for i in range(0, len(tokens), args.batch_size)
    ]

    def build():
        return char_transformer.char_transformer(
            args.sequence_length, args.width, args.depth, args.width // HEAD_SIZE
        )

    rows, calls = {}, {}
    for placement, distribution in placements.items():
        for name in OPTIMIZERS:
            keras.utils.set_random_seed(0)
            with distribution.scope():
                model = build()
                model.compile(optimizer=make_optimizer(name, model), **char_transformer.LOSS)

            def train(model=model, distribution=distribution):
                with distribution.scope():
                    for batch in batches:
                        model.train_on_batch(*batch)

            for _ in range(2):  # warm-up: compilation
                train()
            calls[placement, name] = train
            devices_here = math.prod(distribution.device_mesh.shape)
            rows[placement, name] = {
                "placement": placement,
                "optimizer": name,
                "update flops per device": update_flops(distribution, build, name),
                "ns flops per device": ns_flops(model.optimizer, model, devices_here, name),
            }
    seconds = interleaved_medians(calls, args.rounds)
    for key, row in rows.items():
        row["train step seconds"] = seconds[key] / args.steps
    return {
        "versions": versions("jax"),
        "machine": machine("jax"),
        "devices": f"{len(devices)} × {devices[0]}",
        "setting": (
            f"d {args.width}, depth {args.depth}, global batch {args.batch_size}×"
            f"{args.sequence_length} tokens, {args.rounds} rounds of {args.steps} train steps"
        ),
        "rows": list(rows.values()),
    }


def make_optimizer(name, model):
    import keras

    import keras_muon

    if name == "keras.optimizers.AdamW":
        return keras.optimizers.AdamW()
    optimizer = keras_muon.Muon(ns_steps=NS_STEPS, split_newton_schulz=not name.endswith("unsplit"))
    optimizer.attach(model)
    return optimizer


def update_flops(distribution, build, name):
    """The FLOPs one device executes in a compiled `optimizer.apply` under
    `distribution`, from XLA's cost analysis."""
    import jax
    import numpy as np

    with distribution.scope():
        model = build()
        optimizer = make_optimizer(name, model)
        optimizer.build(model.trainable_variables)
        variables = [v.value for v in model.trainable_variables]
        grads = [jax.device_put(np.ones(v.shape, v.dtype), v.sharding) for v in variables]
        state = [v.value for v in optimizer.variables]
        compiled = jax.jit(optimizer.stateless_apply).lower(state, grads, variables).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def ns_flops(optimizer, model, devices, name):
    """Newton–Schulz FLOPs per device per step, counted from the routing:
    per group of blocks of one shape, its share of the blocks."""
    from keras_muon.update.newton_schulz import newton_schulz_flops

    if name == "keras.optimizers.AdamW":
        return 0
    optimizer.build(model.trainable_variables)
    share = 1 if name.endswith("unsplit") else devices
    return sum(
        math.ceil(count / share) * newton_schulz_flops(*shape, NS_STEPS)
        for shape, count in block_groups(optimizer).items()
    )


def print_table(result):
    print(f"\n{result['versions']}, {result['setting']}, {result['devices']}, {result['machine']}")
    column = max(len(row["optimizer"]) for row in result["rows"])
    place = max(len(row["placement"]) for row in result["rows"])
    print(
        f"{'placement':<{place}}  {'optimizer':<{column}} {'step ms':>8} {'× AdamW':>7} "
        f"{'update GFLOP/device':>19} {'× one device':>12} {'NS GFLOP/device':>15} {'× one device':>12}"
    )
    by_key = {(row["placement"], row["optimizer"]): row for row in result["rows"]}
    one_device = result["rows"][0]["placement"]
    for row in result["rows"]:
        adamw = by_key[row["placement"], OPTIMIZERS[0]]
        single = by_key[one_device, row["optimizer"]]
        ratios = [
            f"{row[key] / single[key]:>12.3f}" if single[key] else f"{'-':>12}"
            for key in ("update flops per device", "ns flops per device")
        ]
        print(
            f"{row['placement']:<{place}}  {row['optimizer']:<{column}} "
            f"{1e3 * row['train step seconds']:>8.1f} "
            f"{row['train step seconds'] / adamw['train step seconds']:>7.2f} "
            f"{row['update flops per device'] / 1e9:>19.3f} {ratios[0]} "
            f"{row['ns flops per device'] / 1e9:>15.3f} {ratios[1]}"
        )


if __name__ == "__main__":
    main()
