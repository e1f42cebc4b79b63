"""Train the char transformer with keras_muon.Muon on one device, then data
parallel and model parallel with keras.distribution on JAX, and compare.

Data parallel keeps a copy of the model on every device and splits each
batch between them. Model parallel arranges the devices in a (batch, model)
mesh; a LayoutMap splits the attention heads and the feed-forward units
over the model axis, and each momentum of keras_muon takes the layout of
its variable. Newton–Schulz needs each matrix whole: under `jit`, XLA adds
the communication it takes. The three runs start from the same weights and
see the same batches, so their curves coincide up to float round-off; the
table gives the largest weight difference from the one-device run.

Without an accelerator, JAX splits the CPU into --cpu-devices devices, so
this runs anywhere (slowly: the devices share the CPU's cores):

    KERAS_BACKEND=jax python examples/distributed_jax.py

On a host with several GPUs or TPU cores, the same command trains on all of
them (--cpu-devices then changes nothing). On several hosts, or as several
processes on one, start it once per process with the same coordinator
address (the first process's host and a free port), each with its
`--process-id`; the processes join through `keras.distribution.initialize`
and train on the devices of all of them (on CPUs, --cpu-devices per
process, with gloo collectives):

    KERAS_BACKEND=jax python examples/distributed_jax.py --num-processes 2 --process-id 0 --coordinator 127.0.0.1:1234 &
    KERAS_BACKEND=jax python examples/distributed_jax.py --num-processes 2 --process-id 1 --coordinator 127.0.0.1:1234

Each process feeds `fit` the same `tf.data` pipeline, and Keras gives each
its part of every batch; the first process prints the tables and writes
the files.

Prints keras_muon's routing table, the sharded variables of the model
parallel run with their momentums, and a table of validation loss, weight
difference and wall time; writes the curves to <output>/distributed_jax.png
and .json.
"""

import contextlib
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import char_transformer  # noqa: E402
import common  # noqa: E402

OPTIMIZER = "keras_muon.Muon"


def layout_map(mesh):
    """Attention heads and feed-forward units split over the "model" axis:
    query, key and value kernels `(d, heads, head_dim)` and the up
    projection `(d, 4d)` along their outputs, the attention output
    `(heads, head_dim, d)` and down projection `(4d, d)` along their
    inputs. Everything else is replicated."""
    layouts = keras.distribution.LayoutMap(mesh)
    layouts["block.*_attention/(query|key|value)/kernel"] = (None, "model", None)
    layouts["block.*_attention/attention_output/kernel"] = ("model", None, None)
    layouts["block.*_up/kernel"] = (None, "model")
    layouts["block.*_down/kernel"] = ("model", None)
    return layouts


def distributions(args, devices=None):
    """The runs: name → keras.distribution (None: one device), over
    `devices` (default all)."""
    devices = devices or keras.distribution.list_devices()
    if len(devices) % args.model_axis:
        raise ValueError(
            f"--model-axis ({args.model_axis}) must divide the number of devices ({len(devices)})."
        )
    for flag, size, divisor, name in [
        ("--batch-size", args.batch_size, len(devices), "the number of devices"),
        ("--validation-size", args.validation_size, len(devices), "the number of devices"),
        ("--heads", args.heads, args.model_axis, "--model-axis"),
    ]:
        if size % divisor:
            raise ValueError(f"{flag} ({size}) must be a multiple of {name} ({divisor}).")
    mesh = keras.distribution.DeviceMesh(
        (len(devices) // args.model_axis, args.model_axis), ["batch", "model"], devices
    )
    return {
        "1 device": None,
        f"data parallel, {len(devices)} devices": keras.distribution.DataParallel(devices=devices),
        f"model parallel, {mesh.shape[0]}×{mesh.shape[1]} mesh": keras.distribution.ModelParallel(
            layout_map=layout_map(mesh), batch_dim_name="batch"
        ),
    }


def sharded_variables(model):
    """Rows for the variables split between devices, model and optimizer."""
    rows = []
    for variable in model.trainable_variables + model.optimizer.variables:
        layout = tuple(variable.value.sharding.spec)
        if any(axis is not None for axis in layout):
            rows.append(
                {
                    "variable": variable.path,
                    "shape": str(tuple(variable.shape)),
                    "layout": str(layout),
                }
            )
    return rows


def argument_parser():
    parser = common.argument_parser(__doc__, steps=200)
    common.add_text_model_flags(parser)
    parser.add_argument(
        "--cpu-devices",
        type=common.positive_int,
        default=8,
        help="devices the CPU is split into when there is no accelerator (default 8)",
    )
    parser.add_argument(
        "--model-axis",
        type=common.positive_int,
        default=2,
        help="devices along the model axis of the model parallel mesh; must "
        "divide the number of devices and --heads (default 2)",
    )
    parser.add_argument(
        "--num-processes",
        type=common.positive_int,
        default=1,
        help="processes to train as one, with --process-id and --coordinator (default 1)",
    )
    parser.add_argument(
        "--process-id", type=int, default=0, help="this process, from 0 (default 0)"
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="the first process's address, the same for every process",
    )
    return parser


def start_processes(args):
    """Joins the other processes (`--num-processes` > 1): before JAX first
    lists its devices."""
    if args.num_processes == 1:
        return
    if args.coordinator is None or not 0 <= args.process_id < args.num_processes:
        raise ValueError("--num-processes needs --coordinator and a --process-id below it.")
    # The collectives of CPU devices (accelerators bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        job_addresses=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )


def fit_on_all_processes(model, args, data):
    """`common.fit_curves` where `fit` reads `tf.data` pipelines, which
    Keras splits between the processes, batch by batch."""
    import tensorflow as tf

    (x, y), validation = data
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size)
    validation = tf.data.Dataset.from_tensor_slices(validation).batch(args.validation_size)
    return common.fit_curves(model, train, validation, args.steps, None, args.eval_every)


def gathered_weights(model):
    """The weights of a model distributed over every process, as NumPy
    arrays gathered whole."""
    from jax.experimental import multihost_utils

    return [
        np.asarray(multihost_utils.process_allgather(v.value, tiled=True)) for v in model.weights
    ]


def main(argv=None):
    args = argument_parser().parse_args(argv)
    if keras.backend.backend() != "jax":
        raise SystemExit(
            "keras.distribution runs on JAX: KERAS_BACKEND=jax python examples/distributed_jax.py"
        )
    # Must come before JAX first lists its devices.
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    start_processes(args)
    weights, data = char_transformer.initial_weights(args), char_transformer.text_data(args)
    peak = common.peak_learning_rate(OPTIMIZER, args.learning_rate)
    runs, rows = {}, []
    for name, distribution in distributions(args).items():
        print(f"\n{name}")
        with distribution.scope() if distribution else contextlib.nullcontext():
            model = common.compiled_model(
                OPTIMIZER,
                peak,
                char_transformer.model_builder(args),
                weights,
                args.steps,
                char_transformer.LOSS,
                show_routes=distribution is None,
            )
            if args.num_processes > 1 and distribution is not None:
                runs[name] = curves = fit_on_all_processes(model, args, data)
            else:
                runs[name] = curves = common.fit_curves(
                    model, *data, args.steps, args.batch_size, args.eval_every
                )
        distributed = args.num_processes > 1 and distribution is not None
        trained = gathered_weights(model) if distributed else model.get_weights()
        if distribution is None:
            one_device = trained
        elif "model" in distribution.device_mesh.axis_names and args.process_id == 0:
            common.print_table(
                f"{name}: sharded variables (the others are replicated)", sharded_variables(model)
            )
        rows.append(
            {
                "run": name,
                "validation loss": curves["val_loss"][-1],
                "max |Δweight| from 1 device": max(
                    float(np.max(np.abs(a - b))) for a, b in zip(one_device, trained)
                ),
                "fit seconds": curves["seconds"],
            }
        )
    title = (
        f"{OPTIMIZER}, char transformer, {args.steps} steps of "
        f"{args.batch_size}×{args.sequence_length} bytes, "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process{'es' * (jax.process_count() > 1)}"
    )
    if args.process_id != 0:
        return rows
    common.print_table(title, rows)
    common.save_json(args.output, "distributed_jax", runs)
    print(
        f"\nplot: {common.plot_curves(args.output, 'distributed_jax', title, runs, ['val_loss', 'loss'])}"
    )
    return rows


if __name__ == "__main__":
    main()
