"""Step time, update time, optimizer state and Newton–Schulz throughput of
keras_muon's optimizers (Muon, NorMuon, AdaMuon, ...), keras.optimizers.AdamW
and keras.optimizers.Muon.

The model is the GPT-like char transformer of examples/char_transformer.py
(MultiHeadAttention with 64-dimensional heads, a 4·d feed-forward layer,
byte vocabulary) at each width; both Muons run 5 Newton–Schulz steps. Per
backend and width, in one process, interleaved round by round (medians of
the rounds):

- train step: the wall time of `model.train_on_batch`, which runs the
  train function `fit` compiles, without `fit`'s per-call work (on
  TensorFlow here, whole `fit` calls end on a coarse grid of about 2.5 s,
  which hides differences of a step);
- update: `optimizer.apply` alone on fixed gradients, compiled as `fit`
  compiles it (jax.jit; tf.function with the model's jit_compile; eager
  on torch);
- aten ops (torch): the top-level ATen operations one eager update
  launches, counted by the torch profiler (a multi-tensor operation over
  many variables counts once);
- state: the bytes of the optimizer's variables;
- Newton–Schulz FLOPs per step, counted from each optimizer's routing, and
  the FLOP/s keras_muon's batched Newton–Schulz reaches next to the limit
  set by the same backend's batched matmul: the time of the matrix products
  it performs, each timed alone on the same shapes. keras_muon iterates in
  `--ns-dtype` (float32 by default; bfloat16 on accelerators), and the
  limit's products run in the same dtype.

Prints the tables and writes <output>/step_time_<backend>.json.
`--backend all` runs every backend in its own process.

    python benchmarks/step_time.py --backend all
"""

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BACKENDS = ("jax", "tensorflow", "torch")
NS_STEPS = 5
HEAD_SIZE = 64
ADAMW = "keras.optimizers.AdamW"
MUON = "keras_muon.Muon"
KERAS_MUON = "keras.optimizers.Muon"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend",
        choices=(*BACKENDS, "all"),
        default=os.environ.get("KERAS_BACKEND", "jax"),
        help="Keras backend, or all three (default: $KERAS_BACKEND, else jax)",
    )
    parser.add_argument(
        "--widths",
        type=positive_int,
        nargs="+",
        default=[256, 512],
        help="model widths d (default 256 512)",
    )
    parser.add_argument(
        "--depth", type=positive_int, default=2, help="transformer blocks (default 2)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="sequences per step (default 32)"
    )
    parser.add_argument(
        "--sequence-length",
        type=positive_int,
        default=128,
        help="tokens per sequence (default 128)",
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=7, help="interleaved timing rounds (default 7)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=4, help="train steps per timed round (default 4)"
    )
    parser.add_argument(
        # keras_muon's DTYPES, not imported: keras waits for the backend chosen here.
        "--ns-dtype",
        choices=("float32", "tf32", "bfloat16", "float16"),
        default="float32",
        help="keras_muon's Newton–Schulz precision, its ns_dtype (default float32)",
    )
    jit = parser.add_mutually_exclusive_group()
    jit.add_argument(
        "--jit-compile",
        action="store_true",
        help="compile the train step with jit_compile=True (on torch: torch.compile)",
    )
    jit.add_argument(
        "--no-jit-compile",
        action="store_true",
        help="jit_compile=False (TensorFlow's tf.function without XLA, which Keras's "
        "default picks on CPUs only)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        metavar="NAME",
        default=None,
        help="optimizers to measure, names as examples/common.py's OPTIMIZERS "
        "(default: all of them; AdamW is always measured)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("results"),
        help="folder for the JSON (default ./results)",
    )
    args = parser.parse_args(argv)
    if any(width % HEAD_SIZE for width in args.widths):
        parser.error(f"--widths must be multiples of the head size {HEAD_SIZE}")
    if args.backend == "all":
        run_each_backend(args, argv if argv is not None else sys.argv[1:])
    else:
        os.environ["KERAS_BACKEND"] = args.backend
        measure_backend(args)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run_each_backend(args, argv):
    """Runs this script once per backend, then prints the tables together."""
    forwarded = [a for a in argv if not a.startswith("--backend")]
    if "--backend" in argv:
        i = argv.index("--backend")
        forwarded = argv[:i] + argv[i + 2 :]
    for backend in BACKENDS:
        env = {**os.environ, "KERAS_BACKEND": backend}
        command = [sys.executable, __file__, "--backend", backend, *forwarded]
        subprocess.run(command, env=env, check=True)
    results = [
        json.loads((args.output / f"step_time_{backend}.json").read_text()) for backend in BACKENDS
    ]
    print("\nAll backends")
    for result in results:
        print_tables(result)


def measure_backend(args):
    import keras
    import numpy as np

    sys.path.insert(0, str(EXAMPLES))
    import char_transformer
    import common

    backend = keras.backend.backend()
    result = {
        "backend": backend,
        "versions": versions(backend),
        "machine": machine(backend),
        "setting": (
            f"depth {args.depth}, batch {args.batch_size}×{args.sequence_length} "
            f"tokens, {args.rounds} rounds of {args.steps} train steps, "
            f"keras_muon Newton–Schulz in {args.ns_dtype}"
            + (
                ", jit_compile=True"
                if args.jit_compile
                else ", jit_compile=False"
                if args.no_jit_compile
                else ""
            )
        ),
        "widths": {},
    }
    names = dict.fromkeys([ADAMW, *(args.optimizers or common.OPTIMIZERS)])
    unknown = sorted(set(names) - set(common.OPTIMIZERS))
    if unknown:
        raise ValueError(f"--optimizers: unknown {unknown}; choose from {list(common.OPTIMIZERS)}")
    for width in args.widths:
        print(f"\n{backend}, width {width}", flush=True)
        keras.utils.set_random_seed(0)
        build = functools.partial(
            char_transformer.char_transformer,
            args.sequence_length,
            width,
            args.depth,
            width // HEAD_SIZE,
        )
        rng = np.random.default_rng(0)
        tokens = rng.integers(
            0, char_transformer.VOCABULARY, (args.batch_size * args.steps, args.sequence_length + 1)
        )
        x, y = tokens[:, :-1].astype("int32"), tokens[:, 1:].astype("int32")
        rows = {}
        train_calls, update_calls = {}, {}
        for name in names:
            model = build()
            optimizer = make_optimizer(name, model, args.ns_dtype)
            jit_compile = True if args.jit_compile else False if args.no_jit_compile else "auto"
            model.compile(optimizer=optimizer, jit_compile=jit_compile, **char_transformer.LOSS)
            batches = [
                (x[i : i + args.batch_size], y[i : i + args.batch_size])
                for i in range(0, len(x), args.batch_size)
            ]

            def train(model=model, batches=batches):
                for batch in batches:
                    model.train_on_batch(*batch)

            train()  # compiles
            train_calls[name] = train
            update_calls[name] = update_call(name, model, args.ns_dtype)
            rows[name] = {
                "state bytes": state_bytes(optimizer),
                "ns flops": ns_flops(optimizer, model),
                "aten ops": aten_ops(update_calls[name]) if backend == "torch" else None,
            }
        train_seconds = interleaved_medians(train_calls, args.rounds)
        update_seconds = interleaved_medians(update_calls, args.rounds)
        for name, row in rows.items():
            row["train step seconds"] = train_seconds[name] / args.steps
            row["update seconds"] = update_seconds[name]
        result["widths"][width] = {
            "optimizers": rows,
            "newton_schulz": ns_throughput(build(), args.rounds, args.ns_dtype),
        }
        print_tables({**result, "widths": {width: result["widths"][width]}})
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"step_time_{backend}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")


def make_optimizer(name, model, ns_dtype):
    import common

    factory = common.OPTIMIZERS[name]
    if name.startswith("keras_muon."):
        optimizer = factory(ns_steps=NS_STEPS, ns_dtype=ns_dtype)
        optimizer.attach(model)
        return optimizer
    if name == "keras.optimizers.Muon":
        return factory(ns_steps=NS_STEPS)
    return factory()


def update_call(name, model, ns_dtype):
    """A function running one `apply` of a fresh optimizer `name` on fixed
    gradients, compiled as `fit` compiles its train step."""
    import keras
    import numpy as np

    variables = model.trainable_variables
    optimizer = make_optimizer(name, model, ns_dtype)
    optimizer.build(variables)
    rng = np.random.default_rng(1)
    grads = [
        keras.ops.convert_to_tensor(1e-3 * rng.standard_normal(v.shape).astype("float32"))
        for v in variables
    ]
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        @jax.jit
        def step(optimizer_values, values):
            return optimizer.stateless_apply(optimizer_values, grads, values)

        state = [[v.value for v in optimizer.variables], [v.value for v in variables]]

        def call():
            values, optimizer_values = step(*state)
            jax.block_until_ready(values)
            state[:] = [optimizer_values, values]

        call()
        return call
    if backend == "tensorflow":
        import tensorflow as tf

        step = synced(
            tf.function(lambda: optimizer.apply(grads, variables), jit_compile=model.jit_compile)
        )
        step()
        return step
    return synced(optimizer.apply, grads, variables)


def aten_ops(call):
    """The top-level ATen operations `call` launches, from the torch
    profiler (operations an ATen operation runs inside it are not counted).

        with torch.profiler.profile() as profiler:
            optimizer.apply(grads, variables)
        sum(e.name.startswith("aten::") and not (e.cpu_parent and
            e.cpu_parent.name.startswith("aten::")) for e in profiler.events())
    """
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        call()
    return sum(
        event.name.startswith("aten::")
        and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::"))
        for event in profiler.events()
    )


def interleaved_medians(calls, rounds):
    """Median wall time of each of `calls` ({name: function}), called once
    per round in an order that rotates from round to round."""
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def state_bytes(optimizer):
    """Bytes of the optimizer's state: its variables, but keras_muon's
    record of its class, name and routes (metadata of a few hundred bytes
    kept for checkpoints)."""
    import numpy as np

    from keras_muon.checkpoint import positional_variables

    return sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in positional_variables(optimizer)
    )


def ns_flops(optimizer, model):
    """Newton–Schulz FLOPs per step of `optimizer`, from its routing."""
    import keras

    import keras_muon
    from keras_muon.update.newton_schulz import newton_schulz_flops

    if isinstance(optimizer, keras_muon.Muon):
        optimizer.build(model.trainable_variables)
        return sum(
            row["num_blocks"]
            * newton_schulz_flops(*row["matrix_shape"], optimizer.ns_steps, optimizer.ns_dtype)
            for row in optimizer.routing_table()
            if row["route"] == "muon"
        )
    if isinstance(optimizer, keras.optimizers.Muon):
        # Its rank-2 variables outside `_should_use_adamw`; per step, X·Xᵀ,
        # P·X (r²·c each) and G·G (r³), with (r, c) the sorted shape.
        total = 0
        for variable in model.trainable_variables:
            if not optimizer._should_use_adamw(variable):
                r, c = sorted(variable.shape)
                total += optimizer.ns_steps * 2 * r * r * (2 * c + r)
        return total
    return 0


def block_groups(optimizer):
    """{(rows, cols): number of blocks} of a built keras_muon optimizer:
    the batches of its Newton–Schulz iteration (rows <= cols)."""
    groups = {}
    for row in optimizer.routing_table():
        if row["route"] == "muon":
            shape = tuple(sorted(row["matrix_shape"]))
            groups[shape] = groups.get(shape, 0) + row["num_blocks"]
    return groups


def ns_throughput(model, rounds, ns_dtype):
    """keras_muon's Newton–Schulz on its block groups of `model`, and the
    same matrix products alone (the limit), each compiled as `fit` does."""
    import numpy as np
    from keras import ops

    import keras_muon
    from keras_muon.update.newton_schulz import coefficient_schedule
    from keras_muon.update.newton_schulz import iterate_dtype
    from keras_muon.update.newton_schulz import matmul
    from keras_muon.update.newton_schulz import newton_schulz
    from keras_muon.update.newton_schulz import newton_schulz_flops
    from keras_muon.update.newton_schulz import newton_schulz_matmuls

    optimizer = keras_muon.Muon(ns_steps=NS_STEPS, ns_dtype=ns_dtype)
    optimizer.attach(model)
    optimizer.build(model.trainable_variables)
    groups = block_groups(optimizer)
    schedule = coefficient_schedule("polar_express", NS_STEPS)
    compiled = compiler(model)
    rng = np.random.default_rng(2)
    results = []
    for (r, c), blocks in groups.items():
        wide, square = newton_schulz_matmuls(r, c, NS_STEPS, ns_dtype)

        def products(x, s, wide=wide, square=square):
            # The iteration's products without its other work. Orthonormal
            # rows keep every product bounded: x·xᵀ·x = x and s·s is
            # orthogonal for orthogonal s.
            for _ in range(wide // 2):
                x = matmul(matmul(x, ops.swapaxes(x, -1, -2), ns_dtype), x, ns_dtype)
            for _ in range(square):
                s = matmul(s, s, ns_dtype)
            return x, s

        # Random blocks for Newton–Schulz: orthonormal ones would drive
        # its Gram matrices' off-diagonals to subnormal numbers, which CPUs
        # multiply slowly.
        x = rng.standard_normal((blocks, r, c))
        rows = np.linalg.qr(x.swapaxes(-1, -2))[0].swapaxes(-1, -2)
        s = np.linalg.qr(rng.standard_normal((blocks, r, r)))[0]
        # Momentums are float32; the iteration casts them to `ns_dtype`.
        x = ops.convert_to_tensor(x.astype("float32"))
        rows, s = (
            ops.convert_to_tensor(v.astype("float32"), iterate_dtype(ns_dtype)) for v in (rows, s)
        )
        calls = {
            "newton_schulz": synced(compiled(lambda x: newton_schulz(x, schedule, ns_dtype)), x),
            "products": synced(compiled(products), rows, s),
        }
        for call in calls.values():
            call()  # compiles
        seconds = interleaved_medians(calls, rounds * 3)
        results.append(
            {
                "shape": [blocks, r, c],
                "gram iteration": wide < 2 * NS_STEPS,
                "flops": blocks * newton_schulz_flops(r, c, NS_STEPS, ns_dtype),
                "seconds": seconds["newton_schulz"],
                "limit seconds": seconds["products"],
            }
        )
    return results


def compiler(model):
    """Compiles a function as `fit` compiles its train step."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit
    if backend == "tensorflow":
        import tensorflow as tf

        return lambda f: tf.function(f, jit_compile=model.jit_compile)
    return lambda f: f


def synced(function, *inputs):
    """`function(*inputs)` as a call that returns once the device has
    finished it. (Summing the result in the compiled function instead would
    change it: XLA fuses a product into the sum and computes it without its
    matmul kernel.)"""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return lambda: jax.block_until_ready(function(*inputs))
    if backend == "tensorflow":
        import tensorflow as tf

        wait = tf.test.experimental.sync_devices
    else:
        import torch

        wait = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None

    def call():
        function(*inputs)
        wait()

    return call


def print_tables(result):
    print(
        f"\nbackend {result['backend']} ({result['versions']}), {result['setting']}, {result['machine']}"
    )
    names = {name for entry in result["widths"].values() for name in entry["optimizers"]}
    column = max(len(name) for name in names)
    print(
        f"{'d':>4}  {'optimizer':<{column}} {'step ms':>8} {'× AdamW':>7} {'× Muon':>6} "
        f"{'update ms':>9} {'× k.Muon':>8} {'aten ops':>8} {'state MB':>8} {'× AdamW':>7} "
        f"{'× Muon':>6} {'NS GFLOP':>8}"
    )
    for width, entry in result["widths"].items():
        rows = entry["optimizers"]
        adamw, muon, keras_muon = rows[ADAMW], rows.get(MUON), rows.get(KERAS_MUON)

        def ratio(row, base, key, digits):
            return f"{row[key] / base[key]:>{digits}.2f}" if base else f"{'-':>{digits}}"

        for name, row in rows.items():
            print(
                f"{width:>4}  {name:<{column}} {1e3 * row['train step seconds']:>8.1f} "
                f"{ratio(row, adamw, 'train step seconds', 7)} {ratio(row, muon, 'train step seconds', 6)} "
                f"{1e3 * row['update seconds']:>9.2f} {ratio(row, keras_muon, 'update seconds', 8)} "
                f"{'-' if row.get('aten ops') is None else row['aten ops']:>8} "
                f"{row['state bytes'] / 1e6:>8.2f} "
                f"{ratio(row, adamw, 'state bytes', 7)} {ratio(row, muon, 'state bytes', 6)} "
                f"{row['ns flops'] / 1e9:>8.2f}"
            )
    print(
        f"\n{'d':>4}  {'blocks × r × c':<16} {'iteration':<9} {'NS ms':>7} {'NS GFLOP/s':>10} "
        f"{'limit ms':>8} {'limit GFLOP/s':>13} {'of limit':>8}"
    )
    for width, entry in result["widths"].items():
        groups = entry["newton_schulz"]
        for g in groups:
            print(
                f"{width:>4}  {'×'.join(map(str, g['shape'])):<16} "
                f"{'gram' if g['gram iteration'] else 'plain':<9} {1e3 * g['seconds']:>7.1f} "
                f"{g['flops'] / g['seconds'] / 1e9:>10.1f} {1e3 * g['limit seconds']:>8.1f} "
                f"{g['flops'] / g['limit seconds'] / 1e9:>13.1f} {g['limit seconds'] / g['seconds']:>8.0%}"
            )
        total, limit = sum(g["seconds"] for g in groups), sum(g["limit seconds"] for g in groups)
        flops = sum(g["flops"] for g in groups)
        print(
            f"{width:>4}  {'all':<16} {'':<9} {1e3 * total:>7.1f} {flops / total / 1e9:>10.1f} "
            f"{1e3 * limit:>8.1f} {flops / limit / 1e9:>13.1f} {limit / total:>8.0%}"
        )


def versions(backend):
    import keras

    module = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[backend]
    return f"Keras {keras.__version__}, {module} {__import__(module).__version__}"


def machine(backend):
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = f"{model}, {os.cpu_count()} cores"
    gpu = accelerator(backend)
    return f"{gpu} ({cpu})" if gpu else cpu


def accelerator(backend):
    """The name of the accelerator `backend` computes on, or None (CPU)."""
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return None if device.platform == "cpu" else device.device_kind
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return tf.config.experimental.get_device_details(gpus[0]).get("device_name") if gpus else None


if __name__ == "__main__":
    main()
