"""Train-step time of keras.optimizers.AdamW and keras_muon.Muon on one
device and under keras.distribution over all devices (JAX): the char
transformer of examples/char_transformer.py data parallel, with the
Newton–Schulz work split among the devices (keras_muon's default) and not
(`split_newton_schulz=False`), and fully sharded (every matrix over all
devices, ZeRO-3 style); a keras-hub Mixtral with one expert per device,
expert parallel (its expert banks sharded on their expert axis, each
expert whole on one device).

The global batch is split among the devices. Without accelerators, JAX
simulates `--devices` CPU devices, which share the machine's cores: work
that every device repeats shows as time. Per configuration, in one process,
interleaved round by round (medians of the rounds):

- train step: the wall time of `model.train_on_batch`;
- update GFLOP per device: the FLOPs one device executes in the compiled
  `optimizer.apply` (jax.jit of `stateless_apply` on the variables'
  shardings), from XLA's cost analysis of the partitioned program;
- NS GFLOP per device: Newton–Schulz's matrix products counted from the
  routing: all blocks on one device; split, `ceil(n / devices)` blocks of
  each group of `n` blocks of one shape (the rest is zero padding);
- update MB per device: the most memory the compiled update holds at once
  on one device (arguments, outputs not donated, scratch), from XLA's
  memory analysis, the weights and the state donated as `fit` donates them;
- collectives: those of the compiled update, by kind, and whether they
  are the same with twice the Newton–Schulz steps (none runs within the
  iteration).

Prints the table and writes <output>/distributed_step_time.json.

    python benchmarks/distributed_step_time.py
"""

import argparse
import collections
import json
import math
import os
import re
import sys
from pathlib import Path

from memory import donated_update
from step_time import block_groups
from step_time import interleaved_medians
from step_time import machine
from step_time import positive_int
from step_time import versions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HEAD_SIZE = 64
NS_STEPS = 5
OPTIMIZERS = ("keras.optimizers.AdamW", "keras_muon.Muon", "keras_muon.Muon, unsplit")
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")

# The models, by their flag.
MODELS = {"char transformer": "transformer", "Mixtral": "mixtral"}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=8,
        help="simulated CPU devices without accelerators (default 8)",
    )
    parser.add_argument(
        "--width", type=positive_int, default=256, help="model width d (default 256)"
    )
    parser.add_argument(
        "--depth", type=positive_int, default=2, help="transformer blocks (default 2)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="global batch, sequences per step (default 32)",
    )
    parser.add_argument(
        "--sequence-length", type=positive_int, default=64, help="tokens per sequence (default 64)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=7, help="interleaved timing rounds (default 7)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=4, help="train steps per timed round (default 4)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS.values()),
        default=list(MODELS.values()),
        help="the models to measure (default both: the char transformer and Mixtral)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("results"),
        help="folder for the JSON (default ./results)",
    )
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
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by {len(devices)} devices"
        )
    rng = np.random.default_rng(0)
    tokens = rng.integers(
        0, char_transformer.VOCABULARY, (args.batch_size * args.steps, args.sequence_length + 1)
    ).astype("int32")
    batches = [
        (tokens[i : i + args.batch_size, :-1], tokens[i : i + args.batch_size, 1:])
        for i in range(0, len(tokens), args.batch_size)
    ]
    rows, calls = {}, {}
    for model_name, placement, distribution, build, names in placements(args, devices):
        if MODELS[model_name] not in args.models:
            continue
        for name in names:
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
            key = model_name, placement, name
            calls[key] = train
            devices_here = math.prod(distribution.device_mesh.shape)
            compiled = compiled_update(
                distribution, build, lambda m, name=name: make_optimizer(name, m)
            )
            cost = compiled.cost_analysis()
            rows[key] = {
                "model": model_name,
                "placement": placement,
                "optimizer": name,
                "update flops per device": (cost[0] if isinstance(cost, list) else cost)["flops"],
                "ns flops per device": ns_flops(model.optimizer, model, devices_here, name),
                "update bytes per device": peak_bytes(compiled.memory_analysis()),
                "collectives": update_collectives(
                    distribution, build, lambda m, name=name: make_optimizer(name, m)
                ),
                f"collectives, ns_steps {2 * NS_STEPS}": update_collectives(
                    distribution, build, lambda m, name=name: make_optimizer(name, m, 2 * NS_STEPS)
                ),
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


def placements(args, devices):
    """`(model, placement, distribution, build, optimizers)` of each run:
    the char transformer on one device, data parallel and fully sharded
    (every matrix over all devices, ZeRO-3 style); a keras-hub Mixtral
    with one expert per device, on one device and expert parallel."""
    import keras

    sys.path.insert(0, str(EXAMPLES))
    import char_transformer

    n = len(devices)
    one_axis = keras.distribution.DeviceMesh((n,), ["model"], devices)
    fully_sharded = keras.distribution.LayoutMap(one_axis)
    fully_sharded["block.*_attention/(query|key|value)/kernel"] = ("model", None, None)
    fully_sharded["block.*_attention/attention_output/kernel"] = (None, None, "model")
    fully_sharded["block.*_up/kernel"] = ("model", None)
    fully_sharded["block.*_down/kernel"] = (None, "model")
    fully_sharded["token_embedding/embeddings"] = (None, "model")
    fully_sharded["lm_head/kernel"] = ("model", None)
    experts = keras.distribution.LayoutMap(one_axis)
    experts[".*expert_feedforward.*"] = ("model", None, None)

    def transformer():
        return char_transformer.char_transformer(
            args.sequence_length, args.width, args.depth, args.width // HEAD_SIZE
        )

    def mixtral():
        import keras_hub

        backbone = keras_hub.models.MixtralBackbone(
            vocabulary_size=char_transformer.VOCABULARY,
            num_layers=args.depth,
            num_query_heads=args.width // HEAD_SIZE,
            num_key_value_heads=args.width // HEAD_SIZE,
            hidden_dim=args.width,
            intermediate_dim=2 * args.width,
            num_experts=n,
            top_k=2,
        )
        tokens = keras.Input((args.sequence_length,), dtype="int32")
        inputs = {"token_ids": tokens, "padding_mask": keras.ops.ones_like(tokens)}
        causal_lm = keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None)
        return keras.Model(tokens, causal_lm(inputs))

    one = keras.distribution.DataParallel(devices=devices[:1])
    split = ("keras.optimizers.AdamW", "keras_muon.Muon")
    return [
        ("char transformer", "one device", one, transformer, split),
        (
            "char transformer",
            f"DataParallel, {n} devices",
            keras.distribution.DataParallel(devices=devices),
            transformer,
            OPTIMIZERS,
        ),
        (
            "char transformer",
            f"fully sharded, {n} devices",
            keras.distribution.ModelParallel(layout_map=fully_sharded, batch_dim_name="model"),
            transformer,
            split,
        ),
        ("Mixtral", "one device", one, mixtral, split),
        (
            "Mixtral",
            f"expert parallel, {n} devices",
            keras.distribution.ModelParallel(layout_map=experts, batch_dim_name="model"),
            mixtral,
            split,
        ),
    ]


def peak_bytes(memory):
    """The most memory a compiled program holds at once, from XLA's memory
    analysis: its arguments, its outputs that do not alias them, and its
    scratch space."""
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


def make_optimizer(name, model, ns_steps=NS_STEPS):
    import keras

    import keras_muon

    if name == "keras.optimizers.AdamW":
        return keras.optimizers.AdamW()
    optimizer = keras_muon.Muon(ns_steps=ns_steps, split_newton_schulz=not name.endswith("unsplit"))
    optimizer.attach(model)
    return optimizer


def compiled_update(distribution, build, optimizer):
    """`optimizer.apply` for the variables of `build()`, compiled under
    `distribution`: jax.jit of `stateless_apply` on the variables'
    shardings. `optimizer` is an optimizer, or a function of the model that
    makes one."""
    import jax
    import numpy as np

    with distribution.scope():
        model = build()
        if callable(optimizer) and not hasattr(optimizer, "apply"):
            optimizer = optimizer(model)
        if hasattr(optimizer, "attach"):
            optimizer.attach(model)
        optimizer.build(model.trainable_variables)
        variables = [v.value for v in model.trainable_variables]
        grads = [jax.device_put(np.ones(v.shape, v.dtype), v.sharding) for v in variables]
        state = [v.value for v in optimizer.variables]
        # Donated as Keras's train step donates them (benchmarks/memory.py).
        update = jax.jit(donated_update(optimizer), donate_argnums=(0, 1))
        return update.lower(variables, state, grads).compile()


def update_flops(distribution, build, name):
    """The FLOPs one device executes in a compiled `optimizer.apply` under
    `distribution`, from XLA's cost analysis."""
    cost = compiled_update(
        distribution, build, lambda model: make_optimizer(name, model)
    ).cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def update_collectives(distribution, build, optimizer):
    """`{kind: count}` of the collectives in the compiled `optimizer.apply`
    (see `compiled_update`), from the text of the partitioned program."""
    text = compiled_update(distribution, build, optimizer).as_text()
    kinds = re.findall(rf" ({'|'.join(COLLECTIVES)})(?:-start)?\(", text)
    return dict(collections.Counter(kinds))


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
    """Per model and placement: the train step against AdamW's in the same
    placement, the update's FLOPs and Newton–Schulz FLOPs per device
    against one device, its peak memory per device against AdamW's, and the
    collectives of the compiled update (and whether doubling `ns_steps`
    leaves them as they are)."""
    print(f"\n{result['versions']}, {result['setting']}, {result['devices']}, {result['machine']}")
    rows = result["rows"]
    by_key = {(row["model"], row["placement"], row["optimizer"]): row for row in rows}
    header = (
        "model",
        "placement",
        "optimizer",
        "step ms",
        "× AdamW",
        "update GFLOP/device",
        "× one device",
        "NS GFLOP/device",
        "update MB/device",
        "× AdamW",
        "collectives",
        f"same at ns_steps {2 * NS_STEPS}",
    )
    lines = [header]
    for row in rows:
        adamw = by_key[row["model"], row["placement"], OPTIMIZERS[0]]
        single = by_key[row["model"], "one device", row["optimizer"].removesuffix(", unsplit")]
        flops = row["update flops per device"]
        lines.append(
            (
                row["model"],
                row["placement"],
                row["optimizer"],
                f"{1e3 * row['train step seconds']:.1f}",
                f"{row['train step seconds'] / adamw['train step seconds']:.2f}",
                f"{flops / 1e9:.3f}",
                f"{flops / single['update flops per device']:.3f}",
                f"{row['ns flops per device'] / 1e9:.3f}",
                f"{row['update bytes per device'] / 1e6:.2f}",
                f"{row['update bytes per device'] / adamw['update bytes per device']:.2f}",
                ", ".join(f"{count} {kind}" for kind, count in sorted(row["collectives"].items()))
                or "none",
                "yes"
                if row["collectives"] == row[f"collectives, ns_steps {2 * NS_STEPS}"]
                else "no",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print(
            "  ".join(
                cell.ljust(w) if i < 3 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths))
            )
        )


if __name__ == "__main__":
    main()
