"""Optimizer memory per device at LLM size, compile-only (JAX): nothing is
allocated, so an 8B-parameter model is measured on a laptop.

The model is built with its variables deferred
(`keras.StatelessScope(initialize_variables=False)`), and so is the
optimizer's state; `optimizer.stateless_apply` is compiled for the
variables' shardings with the state and the weights donated, as Keras's
JAX trainer donates them, and XLA's memory analysis of the partitioned
program is read. Per device:

- state: the optimizer's variables, each its shard;
- update scratch: the compiled update's temporary buffers;
- state + scratch, and both against AdamW's state in the same layout;
- train step: the peak of the whole compiled train step (arguments,
  outputs not donated, scratch) at `--sequence-length` tokens per device,
  against AdamW's.

Models: keras-hub's Llama at Llama-3-8B width (d 4096, 32 query heads and
8 key/value heads of 128, feed-forward 14336, vocabulary 128256) at depth
8 and 32; a Mixtral-like keras-hub Mixtral (the same attention, 8 experts
of feed-forward 14336 per layer, vocabulary 32000) at depth 2 (its memory
grows linearly with depth). Layouts: data parallel over 8 devices; fully
sharded (every matrix and embedding split on one axis, ZeRO-3 style) over
8 and 64; expert parallel over 8 (each expert whole on one device, the
rest replicated); expert parallel 8 × fully sharded 8.

XLA:CPU's buffer assignment is not a GPU's: the numbers compare designs
and layouts, like with like, on this compiler. Compiling at depth 32 takes
about a minute and 2 GB of host memory per configuration.

    python benchmarks/memory.py [--depths 8 32] [--optimizers ...]
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from step_time import machine
from step_time import versions

WIDTH, HEADS, KV_HEADS, FEED_FORWARD = 4096, 32, 8, 14336
LLAMA_VOCABULARY, MIXTRAL_VOCABULARY, EXPERTS = 128256, 32000, 8
ADAMW = "keras.optimizers.AdamW"
# keras_muon's rows: its defaults; all blocks of a shape in one batch, as
# before `ns_bucket_bytes`; bfloat16 Newton–Schulz iterates; an int8 momentum.
OPTIMIZERS = {
    ADAMW: {},
    "keras_muon.Muon": {},
    "keras_muon.Muon, one bucket per shape": {"ns_bucket_bytes": 2**50},
    "keras_muon.Muon ns_dtype=bfloat16": {"ns_dtype": "bfloat16"},
    "keras_muon.Muon momentum_dtype=int8": {"momentum_dtype": "int8"},
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--mixtral-depth", type=int, default=2)
    parser.add_argument(
        "--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS)
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=None,
        help="names of layouts to measure (default all; see `layouts`)",
    )
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=2048,
        help="tokens per device in the train step (default 2048, one sequence)",
    )
    parser.add_argument(
        "--train-step-depths",
        type=int,
        nargs="*",
        default=[8],
        help="the Llama depths whose whole train step is compiled too (default 8)",
    )
    parser.add_argument("--output", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    jax.config.update("jax_num_cpu_devices", 64)
    rows = []
    for model, layout, depth, build, distribution in layouts(args):
        for name in args.optimizers:
            start = time.perf_counter()
            train_step = model == "Llama" and depth in args.train_step_depths
            row = measure(build, distribution, name, args, train_step)
            row.update(model=model, layout=layout, depth=depth, optimizer=name)
            row["compile seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"versions": versions("jax"), "machine": machine("jax"), "rows": rows}
    print_table(result)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "memory.json").write_text(json.dumps(result, indent=1))


def layouts(args):
    """`(model, layout, depth, build, distribution)` of each measurement."""
    import keras

    devices = keras.distribution.list_devices()
    rows = []
    for depth in args.depths:
        for n, name in [(8, "data parallel 8"), (8, "fully sharded 8"), (64, "fully sharded 64")]:
            mesh = keras.distribution.DeviceMesh((n,), ["model"], devices[:n])
            if name.startswith("data"):
                distribution = keras.distribution.DataParallel(devices=devices[:n])
            else:
                distribution = keras.distribution.ModelParallel(
                    layout_map=fully_sharded(mesh, "model"), batch_dim_name="model"
                )
            rows.append(("Llama", name, depth, _llama(depth), distribution))
    ep = keras.distribution.DeviceMesh((8,), ["expert"], devices[:8])
    experts = keras.distribution.LayoutMap(ep)
    experts[".*experts/.*"] = ("expert", None, None)
    ep_fsdp = keras.distribution.DeviceMesh((8, 8), ["expert", "fsdp"], devices)
    # Keras lays an axis of a variable over one mesh axis: the matrices
    # outside the experts are split over "fsdp" and repeated over "expert".
    sharded_experts = fully_sharded(ep_fsdp, "fsdp")
    sharded_experts[".*experts/.*"] = ("expert", "fsdp", None)
    depth = args.mixtral_depth
    for name, layout_map in [
        ("expert parallel 8", experts),
        ("expert parallel 8 × fully sharded 8", sharded_experts),
    ]:
        batch = layout_map.device_mesh.axis_names[0]
        distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=batch)
        rows.append(("Mixtral", name, depth, _mixtral(depth), distribution))
    return [row for row in rows if args.layouts is None or row[1] in args.layouts]


def fully_sharded(mesh, axis):
    """Every kernel and embedding of a keras-hub decoder split along one of
    its axes of size 4096 over `axis` (ZeRO-3 style); norms replicated."""
    import keras

    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*(query|key|value)/kernel"] = (axis, None, None)
    layout_map[".*attention_output/kernel"] = (None, None, axis)
    layout_map[".*/feedforward_(gate|intermediate)_dense/kernel"] = (axis, None)
    layout_map[".*/feedforward_output_dense/kernel"] = (None, axis)
    layout_map[".*sparse_feedforward_gate_dense/kernel"] = (axis, None)
    layout_map["token_embedding/embeddings"] = (None, axis)
    layout_map["token_embedding/reverse_embeddings"] = (axis, None)
    return layout_map


def _llama(depth):
    return _decoder("LlamaBackbone", depth, vocabulary_size=LLAMA_VOCABULARY)


def _mixtral(depth):
    return _decoder(
        "MixtralBackbone",
        depth,
        vocabulary_size=MIXTRAL_VOCABULARY,
        num_experts=EXPERTS,
        top_k=2,
    )


def _decoder(backbone_name, depth, **config):
    """A function that builds keras-hub's `backbone_name` at Llama-3-8B
    width and `depth` layers, with `config`, as a causal LM."""

    def build():
        import keras_hub

        backbone = getattr(keras_hub.models, backbone_name)(
            num_layers=depth,
            num_query_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            hidden_dim=WIDTH,
            intermediate_dim=FEED_FORWARD,
            **config,
        )
        return _causal_lm(backbone)

    return build


def _causal_lm(backbone):
    """Token ids → logits, through `backbone` and its tied-or-not head."""
    import keras

    tokens = keras.Input((None,), dtype="int32")
    hidden = backbone({"token_ids": tokens, "padding_mask": keras.ops.ones_like(tokens)})
    logits = backbone.token_embedding(hidden, reverse=True)
    return keras.Model(tokens, logits)


def make_optimizer(name, model):
    import keras

    import keras_muon

    if name == ADAMW:
        return keras.optimizers.AdamW()
    optimizer = keras_muon.Muon(**OPTIMIZERS[name])
    optimizer.attach(model)
    return optimizer


def measure(build, distribution, name, args, train_step):
    """The row of one model, layout and optimizer (see the docstring)."""
    import jax
    import keras

    deferred = keras.StatelessScope(initialize_variables=False)
    with distribution.scope():
        with deferred:
            model = build()
        for v in model.variables:
            v._initialize_layout()  # a deferred variable takes it when initialized
        optimizer = make_optimizer(name, model)
        with keras.StatelessScope(initialize_variables=False):
            optimizer.build(model.trainable_variables)
        for v in optimizer.variables:
            v._initialize_layout()
        weights = [abstract(v) for v in model.trainable_variables]
        state = [abstract(v) for v in optimizer.variables]
        with keras.StatelessScope(initialize_variables=False):
            update = jax.jit(donated_update(optimizer), donate_argnums=(0, 1))
            memory = update.lower(weights, state, weights).compile().memory_analysis()
        row = {
            "state bytes": sum(shard_bytes(s) for s in state),
            "update scratch bytes": memory.temp_size_in_bytes,
            "update outputs not donated bytes": memory.output_size_in_bytes
            - memory.alias_size_in_bytes,
        }
        if train_step:
            row["train step peak bytes"] = train_step_peak(model, optimizer, distribution, args)
    return row


def donated_update(optimizer):
    """`optimizer.stateless_apply` with the weights and the state first among
    its arguments, in the order of its outputs. XLA gives a donated buffer
    to an output of the same shape in the order it meets them, as Keras's
    train step's state, in and out in one order, lets it: with the order of
    `stateless_apply`'s arguments, a weight's new value would take another
    variable's buffer, and the buffers still to be read be copied."""

    def update(weights, state, grads):
        return optimizer.stateless_apply(state, grads, weights)

    return update


def train_step_peak(model, optimizer, distribution, args):
    """The peak bytes per device of `model`'s compiled train step with
    `optimizer`, at `args.sequence_length` tokens per device."""
    import jax
    import keras

    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.optimizer = optimizer  # compile wraps nothing; `fit` would build it
    devices = math.prod(distribution.device_mesh.shape)
    batch = devices  # one sequence per device
    data_layout = distribution.get_data_layout((batch, args.sequence_length))
    tokens = jax.ShapeDtypeStruct(
        (batch, args.sequence_length), "int32", sharding=data_layout.backend_layout
    )
    with keras.StatelessScope(initialize_variables=False):
        state = (
            [abstract(v) for v in model.trainable_variables],
            [abstract(v) for v in model.non_trainable_variables],
            [abstract(v) for v in optimizer.variables],
            [abstract(v) for v in model.metrics_variables],
        )
        shardings = jax.tree.map(lambda struct: struct.sharding, state)
        step = jax.jit(model.train_step, donate_argnums=0, out_shardings=(None, shardings))
        memory = step.lower(state, (tokens, tokens)).compile().memory_analysis()
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


def abstract(variable):
    """`variable` as a `jax.ShapeDtypeStruct` with its sharding."""
    import jax

    value = variable._value
    if value is not None:
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
    layout = variable._layout
    sharding = None if layout is None else getattr(layout, "backend_layout", layout)
    if sharding is None:
        sharding = _replicated()
    return jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=sharding)


def _replicated():
    import jax
    import keras

    mesh = keras.distribution.distribution().device_mesh.backend_mesh
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def shard_bytes(struct):
    """The bytes of one device's shard of `struct`."""
    shape = struct.sharding.shard_shape(struct.shape)
    return math.prod(shape) * struct.dtype.itemsize


def print_table(result):
    """Per model, depth and layout, each optimizer's memory per device in
    GB and against AdamW's state (and train step) in the same layout."""
    print(f"\n{result['versions']}, {result['machine']}, compile-only, per device")
    rows = result["rows"]
    adamw = {(r["model"], r["layout"], r["depth"]): r for r in rows if r["optimizer"] == ADAMW}
    header = (
        "model",
        "depth",
        "layout",
        "optimizer",
        "state GB",
        "scratch GB",
        "state+scratch GB",
        "× AdamW state",
        "train step GB",
        "× AdamW",
    )
    lines = [header]
    for r in rows:
        base = adamw.get((r["model"], r["layout"], r["depth"]))
        total = r["state bytes"] + r["update scratch bytes"]
        step = r.get("train step peak bytes")
        lines.append(
            (
                r["model"],
                str(r["depth"]),
                r["layout"],
                r["optimizer"],
                f"{r['state bytes'] / 1e9:.2f}",
                f"{r['update scratch bytes'] / 1e9:.2f}",
                f"{total / 1e9:.2f}",
                f"{total / base['state bytes']:.2f}" if base else "",
                f"{step / 1e9:.2f}" if step else "",
                f"{step / base['train step peak bytes']:.2f}"
                if step and base and base.get("train step peak bytes")
                else "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print(
            "  ".join(
                c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
            )
        )


if __name__ == "__main__":
    sys.exit(main())
