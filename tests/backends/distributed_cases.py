"""The training runs of the distribution tests, and their checks.

A small transformer is trained a few steps on one device and distributed:
with keras.distribution (DataParallel and ModelParallel) on 8 simulated CPU
devices on JAX, with tf.distribute strategies on 2 logical CPU devices on
TensorFlow, and with torch DistributedDataParallel over 2 processes on
torch. Devices must be set up before the backend starts, so each case runs
this file as a script in a subprocess (`python distributed_cases.py
<backend>[:<strategy>] <output file>`), which writes what it measured to
JSON; the tests (test_distributed.py, test_tf_distribute.py) check it. Each
case also records which blocks each device orthogonalized
(`split_newton_schulz`), and the weights with the split turned off.
"""

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np

import keras_muon
from keras_muon.backends import distributed

ROOT = Path(__file__).resolve().parents[2]
BACKEND = keras.backend.backend()

STEPS, BATCH, SEQUENCE, WIDTH, HEADS, DEPTH = 4, 16, 32, 64, 4, 2
LEARNING_RATE = 0.02
# Below the largest attention logits of every step (3.7 to 5.5), above
# most: QK-Clip clips a few heads each step.
QK_CLIP = {"qk_clip_threshold": 3.5}
# Muon's blocks in this model, stacked per shape: 4 attention projections
# (64×64) per block, and the up and (transposed) down projections (64×256).
BLOCK_BATCHES = [(2 * DEPTH, WIDTH, 4 * WIDTH), (4 * DEPTH, WIDTH, WIDTH)]
# MirroredStrategy with merge_call (the default) and without it, as it runs
# XLA-compiled steps on GPUs; OneDeviceStrategy stands for the others.
TF_STRATEGIES = ["MirroredStrategy", "MirroredStrategy without merge_call", "OneDeviceStrategy"]
# ModelParallel on a (batch 2, model 4) mesh: attention heads and
# feed-forward units (Muon), embedding features and the LM head's vocabulary
# (AdamW) are split over the model axis.
MODEL_PARALLEL_LAYOUTS = {
    "block.*_attention/(query|key|value)/kernel": (None, "model", None),
    "block.*_attention/attention_output/kernel": ("model", None, None),
    "block.*_up/kernel": (None, "model"),
    "block.*_down/kernel": ("model", None),
    "token_embedding/embeddings": (None, "model"),
    "lm_head/kernel": (None, "model"),
}


def run_case(case, tmp_path, timeout=600):
    output = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, __file__, case, str(output)],
        env=dict(os.environ, KERAS_BACKEND=BACKEND),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(output.read_text())


def check_clipped_as_on_one_device(result):
    """QK-Clip clipped heads, and distributed as on one device: the query
    and key kernels it rescales, and the Muon momentums. (The AdamW side
    is compared without QK-Clip: where its gradients are round-off, as
    for the key bias, AdamW's normalized update differs by up to lr.)"""
    assert result["clipped heads"] > 0, result
    assert result["max query/key kernel difference"] <= 1e-4, result
    assert result["max momentum relative difference"] <= 1e-3, result


def check_matches_one_device(result):
    # Momentums are compared relative to their size: unlike the weights,
    # they show a wrongly scaled gradient (msign ignores the scale).
    assert result["max weight difference"] <= 1e-4, result
    assert result["max momentum relative difference"] <= 1e-3, result


# What runs in the subprocess.


def transformer():
    sys.path.insert(0, str(ROOT / "examples"))
    from char_transformer import char_transformer

    return char_transformer(SEQUENCE, WIDTH, DEPTH, HEADS)


def initial_weights_and_data():
    keras.utils.set_random_seed(0)
    weights = transformer().get_weights()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (STEPS * BATCH, SEQUENCE + 1)).astype("int32")
    return weights, (tokens[:, :-1], tokens[:, 1:])


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def fit(weights, data, scope=None, optimizer_type=keras_muon.Muon, build=transformer, **options):
    """Trains `build()` with `optimizer_type(**options)` under `scope` (a
    distribution's, or none); returns the model and the optimizer."""
    with scope or contextlib.nullcontext():
        model = build()
        model.set_weights(weights)
        optimizer = optimizer_type(learning_rate=LEARNING_RATE, **options)
        model.compile(optimizer=optimizer, loss=loss())
        model.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
    return model, optimizer


def muon_momentums(model, optimizer):
    """{variable path: its momentum} for the variables routed to Muon."""
    by_path = {v.path: v for v in optimizer.variables}
    muon = [row["path"] for row in optimizer.routing_table() if row["route"] == "muon"]
    assert len(muon) == 6 * DEPTH  # attention and feed-forward kernels
    return {path: by_path[f"{optimizer.name}/{path.replace('/', '_')}_momentum"] for path in muon}


def snapshot(model, optimizer, to_numpy=True):
    """The weights and Muon momentums, as NumPy arrays by name (or the
    backend's arrays, without `to_numpy`)."""
    arrays = {f"weight {v.path}": v for v in model.trainable_variables if "qk_clip" not in v.path}
    for path, momentum in muon_momentums(model, optimizer).items():
        arrays[f"momentum {path}"] = momentum
    if not to_numpy:
        return {name: v.value for name, v in arrays.items()}
    return {name: keras.ops.convert_to_numpy(v) for name, v in arrays.items()}


def differences(reference, other):
    """Largest weight difference (and among the attention's query and key
    kernels), and largest momentum difference relative to that momentum's
    largest entry, between two snapshots."""

    def largest(keys):
        return max(float(np.max(np.abs(reference[k] - other[k]))) for k in keys)

    weights = [k for k in reference if k.startswith("weight")]
    query_key = [k for k in weights if k.endswith(("query/kernel", "key/kernel"))]
    momentums = max(
        float(np.max(np.abs(reference[k] - other[k])) / np.max(np.abs(reference[k])))
        for k in reference
        if k.startswith("momentum")
    )
    return {
        "max weight difference": largest(weights),
        "max query/key kernel difference": largest(query_key),
        "max momentum relative difference": momentums,
    }


def data_and_model_parallel(devices):
    """`DataParallel` over `devices`, and `ModelParallel` on a (2 × 4)
    (batch, model) mesh of them with `MODEL_PARALLEL_LAYOUTS`."""
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, layout in MODEL_PARALLEL_LAYOUTS.items():
        layout_map[pattern] = layout
    return {
        "DataParallel": keras.distribution.DataParallel(devices=devices),
        "ModelParallel": keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        ),
    }


def jax_case():
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    weights, data = initial_weights_and_data()
    one_device = snapshot(*fit(weights, data))
    devices = keras.distribution.list_devices()
    distributions = data_and_model_parallel(devices)
    result = {"devices": len(devices)}
    for name, distribution in distributions.items():
        model, optimizer = fit(weights, data, distribution.scope())
        result[name] = differences(one_device, snapshot(model, optimizer))
        result[name]["state"] = state_layouts(model, optimizer)
        unsplit = fit(weights, data, distribution.scope(), split_newton_schulz=False)
        result[f"{name} without split"] = differences(one_device, snapshot(*unsplit))
    # What the benchmark measures: XLA's cost analysis of the compiled
    # `optimizer.apply`, per device.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from distributed_step_time import update_flops

    one = keras.distribution.DataParallel(devices=devices[:1])
    split, unsplit = "keras_muon.Muon", "keras_muon.Muon, unsplit"
    result["update FLOPs per device"] = {
        "one device": update_flops(one, transformer, split),
        **{name: update_flops(d, transformer, split) for name, d in distributions.items()},
        "DataParallel without split": update_flops(
            distributions["DataParallel"], transformer, unsplit
        ),
    }
    one_device_clipped, clipped_heads = clipped_snapshot(weights, data)
    for name, distribution in distributions.items():
        model, optimizer = fit(weights, data, distribution.scope(), **QK_CLIP)
        result[f"{name} QK-Clip"] = differences(one_device_clipped, snapshot(model, optimizer))
        result[f"{name} QK-Clip"]["clipped heads"] = clipped_heads

    def model_parallel_state(optimizer_type):
        with distributions["ModelParallel"].scope():
            model = transformer()
            optimizer = optimizer_type()
            optimizer.attach(model)
            optimizer.build(model.trainable_variables)
        return state_layouts(model, optimizer)

    result["ModelParallel AdaMuon second moments"] = [
        row for row in model_parallel_state(keras_muon.AdaMuon) if row["state"] == "second_moment"
    ]
    keras.config.set_dtype_policy("bfloat16")
    result["ModelParallel bfloat16 state"] = [
        row for row in model_parallel_state(keras_muon.Muon) if "model" in row["variable layout"]
    ]
    return result


# Every matrix split over all 8 devices of a one-axis mesh that also
# splits the batch (ZeRO-3 style): attention projections along their heads
# or model axis, feed-forward kernels, the embedding and the LM head.
FULLY_SHARDED_LAYOUTS = {
    "block.*_attention/(query|key|value)/kernel": ("model", None, None),
    "block.*_attention/attention_output/kernel": (None, None, "model"),
    "block.*_up/kernel": ("model", None),
    "block.*_down/kernel": (None, "model"),
    "token_embedding/embeddings": (None, "model"),
    "lm_head/kernel": ("model", None),
}
# keras-hub models for the expert-parallel and tensor-parallel layouts. All
# experts are used by every token (top_k = num_experts): a routing decision
# that round-off flips would say nothing about the optimizer.
HUB = dict(
    vocabulary_size=64, num_layers=1, num_query_heads=4, num_key_value_heads=4, hidden_dim=16
)
MIXTRAL = dict(HUB, intermediate_dim=12, num_experts=4, top_k=4)
LLAMA = dict(HUB, intermediate_dim=32)


def causal_lm(backbone_name, config):
    """A keras-hub causal LM from `config`, on token ids (its padding mask
    all ones), returning logits."""
    import keras_hub

    backbone = getattr(keras_hub.models, backbone_name)(**config)
    tokens = keras.Input((SEQUENCE,), dtype="int32")
    inputs = {"token_ids": tokens, "padding_mask": keras.ops.ones_like(tokens)}
    task = getattr(keras_hub.models, backbone_name.replace("Backbone", "CausalLM"))
    return keras.Model(tokens, task(backbone=backbone, preprocessor=None)(inputs))


class Experts(keras.layers.Layer):
    """A bank of 8 expert matrices `(8, d, 12)`, every token through each."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(8, input_shape[-1], 12), name="kernel")

    def call(self, x):
        return keras.ops.einsum("btd,edf->btef", x, self.kernel)


def experts_rule(layer, variable, per_head):
    view = keras_muon.MatrixView.from_axes(variable.shape, inputs=(1,), outputs=(2,), blocks=(0,))
    return keras_muon.Route(view, "experts")


def experts_model(depth=1):
    """`depth` banks of `Experts` one after the other, and a Dense head."""
    x = tokens = keras.Input((SEQUENCE, 16))
    for i in range(depth):
        name = "experts" if depth == 1 else f"experts_{i}"
        x = keras.layers.Reshape((SEQUENCE, 8 * 12))(Experts(name=name)(x))
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(x))


def update_scratch_bytes(model, optimizer, distribution=None):
    """XLA's scratch of `optimizer`'s compiled update of `model` (JAX), under
    `distribution` if any, compiled for the variables' shardings with the
    weights and the state donated (as Keras's JAX trainer does)."""
    import jax

    optimizer.attach(model)
    optimizer.build(model.trainable_variables)

    def update(weights, state, grads):  # the outputs' order: each buffer reused
        return optimizer.stateless_apply(state, grads, weights)

    def structs(variables):
        return [
            jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.value.sharding) for v in variables
        ]

    weights, state = structs(model.trainable_variables), structs(optimizer.variables)
    scope = contextlib.nullcontext() if distribution is None else distribution.scope()
    with scope, keras.StatelessScope(initialize_variables=False):
        compiled = jax.jit(update, donate_argnums=(0, 1)).lower(weights, state, weights).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def layouts(mesh, table):
    """A LayoutMap on `mesh` from `table` ({pattern: layout})."""
    layout_map = keras.distribution.LayoutMap(mesh)
    for pattern, layout in table.items():
        layout_map[pattern] = layout
    return layout_map


def jax_layouts_case():
    """The layouts LLM trainers use, on 8 simulated devices, each trained
    as on one device with NorMuon per head with QK-Clip: fully sharded, an
    expert-parallel keras-hub Mixtral, and keras-hub Llama's own
    tensor-parallel `get_layout_map`. The collectives of the compiled
    update, and the layout of the per-block state."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from distributed_step_time import update_collectives

    devices = keras.distribution.list_devices()
    one_axis = keras.distribution.DeviceMesh((8,), ["model"], devices)
    two_axes = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)

    import keras_hub

    runs = {
        "fully sharded": (transformer, layouts(one_axis, FULLY_SHARDED_LAYOUTS), "model"),
        "expert parallel": (
            lambda: causal_lm("MixtralBackbone", MIXTRAL),
            layouts(two_axes, {".*expert_feedforward.*": ("model", None, None)}),
            "batch",
        ),
        # Each expert split over the 4 devices of its group: its blocks are
        # gathered whole within the group, by an all-to-all.
        "expert parallel × fully sharded": (
            lambda: causal_lm("MixtralBackbone", MIXTRAL),
            layouts(two_axes, {".*expert_feedforward.*": ("batch", "model", None)}),
            "batch",
        ),
        "keras-hub layout map": (
            lambda: causal_lm("LlamaBackbone", LLAMA),
            keras_hub.models.LlamaBackbone.get_layout_map(two_axes),
            "batch",
        ),
    }
    options = dict(optimizer_type=keras_muon.NorMuon, per_head=True, qk_clip_threshold=1.0)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, HUB["vocabulary_size"], (STEPS * BATCH, SEQUENCE + 1)).astype("int32")
    result, fitted = {}, {}
    for name, (build, layout_map, batch_axis) in runs.items():
        keras.utils.set_random_seed(0)
        weights = build().get_weights()
        data = (
            initial_weights_and_data()[1]
            if build is transformer
            else (tokens[:, :-1], tokens[:, 1:])
        )
        one_device = fit(weights, data, build=build, **options)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name=batch_axis
        )
        model, optimizer = fit(weights, data, distribution.scope(), build=build, **options)
        differences = [
            float(np.max(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b))))
            for a, b in zip(one_device[0].trainable_variables, model.trainable_variables)
        ]
        fitted[name] = model, optimizer, distribution, weights, data
        result[name] = {
            "max weight difference": max(differences),
            "clipped heads": [one_device[1].clipped_heads(), optimizer.clipped_heads()],
            "sharded state": {
                v.path.split("/", 1)[1]: list(v.value.sharding.spec)
                for v in optimizer.variables
                if "neuron_second_moment" in v.path and any(v.value.sharding.spec)
            },
        }
    result["fully sharded, buckets of one block"] = bucketed_difference(
        *fitted["fully sharded"][1:], options
    )
    result["fully sharded, int8 momentum"] = int8_difference(*fitted["fully sharded"][2:])
    keras_muon.register_layer_rule(Experts, experts_rule)
    for name, mesh, table, build in [
        ("experts alone", one_axis, {"experts/kernel": ("model", None, None)}, experts_model),
        ("experts split", two_axes, {"experts/kernel": ("batch", "model", None)}, experts_model),
        ("fully sharded", one_axis, FULLY_SHARDED_LAYOUTS, transformer),
    ]:
        distribution = keras.distribution.ModelParallel(
            layout_map=layouts(mesh, table), batch_dim_name="model"
        )
        result[f"{name}: collectives"] = {
            steps: update_collectives(distribution, build, keras_muon.Muon(ns_steps=steps))
            for steps in (5, 10)
        }
    # One bank a bucket: the scratch of the update is one bucket's, whatever
    # the number of banks, for banks split within each expert, and for an
    # int8 momentum of banks split by expert.
    for name, mesh, layout, options in [
        ("experts split", two_axes, ("batch", "model", None), {}),
        (
            "experts alone, int8 momentum",
            one_axis,
            ("model", None, None),
            {"momentum_dtype": "int8"},
        ),
    ]:
        result[f"{name}: scratch bytes"] = {}
        for depth in (2, 6):
            distribution = keras.distribution.ModelParallel(
                layout_map=layouts(mesh, {"experts.*/kernel": layout}),
                batch_dim_name=mesh.axis_names[0],
            )
            with distribution.scope():
                model = experts_model(depth)
                block = 4 * 96 * 12  # float32 bytes: a (96, 12) bank's share per device
                optimizer = keras_muon.Muon(ns_bucket_bytes=block, **options)
                scratch = update_scratch_bytes(model, optimizer, distribution)
            result[f"{name}: scratch bytes"][depth] = scratch
    with keras.distribution.ModelParallel(
        layout_map=layouts(one_axis, {"experts/kernel": ("model", None, None)}),
        batch_dim_name="model",
    ).scope():
        model = experts_model()
        optimizer = keras_muon.Muon(hyperball=True)
        optimizer.attach(model)
        optimizer.build(model.trainable_variables)
        result["radius layout"] = {
            v.path.split("/", 1)[1]: list(v.value.sharding.spec)
            for v in optimizer.variables
            if "radius" in v.path
        }
    return result


def bucketed_difference(optimizer, distribution, weights, data, options):
    """One step of fully sharded training from `weights` on the first batch
    of `data`, with one bucket per block shape and with buckets of one block
    of the largest shape (as if every variable were whole on each device),
    updated one after another. Returns the buckets per step, the block
    shapes, and the largest weight difference between the two."""
    from keras_muon.update import batching

    muon = [row["matrix_shape"] for row in optimizer.routing_table() if row["route"] == "muon"]
    cut, counts = batching.buckets, []

    def one_share(entries, placements, budget, split_counts):
        buckets = cut(entries, placements, budget, [1] * len(entries))
        counts.append(len(buckets))
        return buckets

    first_batch = tuple(x[:BATCH] for x in data)
    one_shot, _ = fit(weights, first_batch, distribution.scope(), **options)
    batching.buckets = one_share
    try:
        largest = max(4 * math.prod(shape) for shape in muon)
        bucketed, _ = fit(
            weights, first_batch, distribution.scope(), ns_bucket_bytes=largest, **options
        )
    finally:
        batching.buckets = cut
    return {
        "buckets": max(counts),
        "block shapes": len({tuple(sorted(shape)) for shape in muon}),
        "max weight difference": max(
            float(np.max(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b))))
            for a, b in zip(one_shot.trainable_variables, bucketed.trainable_variables)
        ),
    }


def int8_difference(distribution, weights, data):
    """Two steps of Muon with an int8 momentum, fully sharded and on one
    device: the largest weight difference, and the layouts of the momentum
    codes and scales of the sharded run."""
    two_batches = tuple(x[: 2 * BATCH] for x in data)
    one_device, _ = fit(weights, two_batches, momentum_dtype="int8")
    model, optimizer = fit(weights, two_batches, distribution.scope(), momentum_dtype="int8")
    return {
        "max weight difference": max(
            float(np.max(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b))))
            for a, b in zip(one_device.trainable_variables, model.trainable_variables)
        ),
        "layouts": {
            v.path.split("/", 1)[1]: [str(v.dtype), list(v.value.sharding.spec)]
            for v in optimizer.variables
            if v.path.endswith(("block0_up_kernel_momentum", "block0_up_kernel_momentum_scales"))
        },
    }


def clipped_snapshot(weights, data):
    """One device's `snapshot` with QK-Clip, and the heads it clipped in
    the last step."""
    model, optimizer = fit(weights, data, **QK_CLIP)
    return snapshot(model, optimizer), optimizer.clipped_heads()


def state_layouts(model, optimizer):
    """For each state variable of each trainable variable (a momentum; for
    AdamW a velocity; for AdaMuon a second moment): the variable's layout,
    the state's own layout and dtype, and on how many devices it lives."""

    def layout(variable):
        # A variable on one device (no distribution) has no spec: whole.
        spec = list(getattr(variable.value.sharding, "spec", ()))
        return spec + [None] * (len(variable.shape) - len(spec))

    states = {v.path: v for v in optimizer.variables}
    rows = []
    for variable in model.trainable_variables:
        for kind in ("momentum", "velocity", "second_moment"):
            state = states.get(f"{optimizer.name}/{variable.path.replace('/', '_')}_{kind}")
            if state is not None:
                rows.append(
                    {
                        "variable": variable.path,
                        "state": kind,
                        "variable layout": layout(variable),
                        "state layout": layout(state),
                        "state dtype": state.dtype,
                        "state devices": len(state.value.sharding.device_set),
                    }
                )
    return rows


# Checkpoints moved between layouts on 8 simulated JAX devices: saved under
# the first, resumed under the second.
JAX_RESUMES = [
    ("fully sharded", "DataParallel"),
    ("fully sharded", "ModelParallel"),
    ("fully sharded", "one device"),
    ("one device", "fully sharded"),
]


def jax_checkpoint_case():
    """A `.weights.h5` saved after `STEPS` steps under one layout (each of
    JAX_RESUMES) loaded into a fresh model and optimizer under another
    (compile, load_weights, then build, which restores the state), and
    trained `STEPS` more steps on the same batches; with Muon per head,
    and with NorMuon per head (whose per-neuron state has a shape of its
    own) for one move. The state's layout is read once it is restored,
    before `fit`'s compiled step could lay it out again.

    The weights are compared with `2 * STEPS` steps uninterrupted in the
    runs that saved the files, fully sharded and on one device (NorMuon:
    fully sharded), which go on training after saving: the run a file
    comes from shares the resumed run's first `STEPS` steps bit for bit,
    so state restored wrong shows against it alone; one device is what
    every layout trains as (`jax_case`). Uninterrupted DataParallel and
    ModelParallel runs would add two compilations and nothing the
    comparison needs."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    weights, data = initial_weights_and_data()
    devices = keras.distribution.list_devices()
    one_axis = keras.distribution.DeviceMesh((8,), ["model"], devices)
    distributions = {
        "fully sharded": keras.distribution.ModelParallel(
            layout_map=layouts(one_axis, FULLY_SHARDED_LAYOUTS), batch_dim_name="model"
        ),
        **data_and_model_parallel(devices),
        "one device": None,
    }

    def scope(layout):
        distribution = distributions[layout]
        return distribution.scope() if distribution else contextlib.nullcontext()

    def weight_difference(model, other):
        return max(
            float(np.max(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b))))
            for a, b in zip(model.weights, other.weights)
        )

    def shardings(optimizer):
        """{state path less the optimizer's name: [its spec, the ids of its
        devices]}, for every variable of `optimizer`."""
        return {
            v.path.removeprefix(f"{optimizer.name}/"): [
                list(getattr(v.value.sharding, "spec", ())),
                sorted(device.id for device in v.value.sharding.device_set),
            ]
            for v in optimizer.variables
        }

    def new_optimizer(optimizer_type, model):
        optimizer = optimizer_type(learning_rate=LEARNING_RATE, per_head=True)
        model.compile(optimizer=optimizer, loss=loss())
        optimizer.attach(model)
        return optimizer

    def file(optimizer_type, layout):
        return Path(sys.argv[2]).with_name(f"{optimizer_type.__name__} {layout}.weights.h5")

    uninterrupted = {}
    saving_runs = [(keras_muon.Muon, "fully sharded"), (keras_muon.Muon, "one device")]
    saving_runs.append((keras_muon.NorMuon, "fully sharded"))
    for optimizer_type, layout in saving_runs:
        model, optimizer = fit(
            weights, data, scope(layout), optimizer_type=optimizer_type, per_head=True
        )
        model.save_weights(file(optimizer_type, layout))
        with scope(layout):
            model.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
        uninterrupted[optimizer_type, layout] = model, optimizer

    moves = [(keras_muon.Muon, move) for move in JAX_RESUMES]
    moves.append((keras_muon.NorMuon, ("fully sharded", "ModelParallel")))
    result = {}
    for optimizer_type, (saved_in, resumed_in) in moves:
        with scope(resumed_in):
            model = transformer()  # the state as it is laid out when nothing is loaded
            built = new_optimizer(optimizer_type, model)
            built.build(model.trainable_variables)
            model = transformer()
            optimizer = new_optimizer(optimizer_type, model)
            model.load_weights(file(optimizer_type, saved_in))
            optimizer.build(model.trainable_variables)
            restored = {"state": state_layouts(model, optimizer), "shardings": shardings(optimizer)}
            model.fit(*data, batch_size=BATCH, shuffle=False, verbose=0)
        result[f"{optimizer_type.__name__}: {saved_in} to {resumed_in}"] = {
            "max weight difference from uninterrupted": {
                layout: weight_difference(model, run)
                for (trained_by, layout), (run, _) in uninterrupted.items()
                if trained_by is optimizer_type
            },
            "iterations": [
                int(optimizer.iterations),
                int(uninterrupted[optimizer_type, saved_in][1].iterations),
            ],
            "restored state": restored,
            "built state shardings": shardings(built),
        }
    return result


def tensorflow_case(strategy_name):
    """Training under one of TF_STRATEGIES (each in its own process: two
    MirroredStrategy instances in one process mix up their collectives)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    weights, data = initial_weights_and_data()
    one_device = snapshot(*fit(weights, data))
    one_device_clipped, clipped_heads = clipped_snapshot(weights, data)
    newton_schulz = distributed.newton_schulz

    def recorded_fit(**options):
        """`fit` under the strategy, and the shapes of the blocks each
        device orthogonalized."""
        calls = {}

        def recording_newton_schulz(x, *args):
            calls.setdefault(x.device.split("device:")[-1], []).append(list(x.shape))
            return newton_schulz(x, *args)

        distributed.newton_schulz = recording_newton_schulz
        try:
            model, optimizer = fit(weights, data, strategy.scope(), **options)
        finally:
            distributed.newton_schulz = newton_schulz
        result = differences(one_device, snapshot(model, optimizer))
        result["newton_schulz calls"] = calls
        return result, model, optimizer

    if strategy_name == "OneDeviceStrategy":
        strategy = tf.distribute.OneDeviceStrategy("/cpu:1")
    else:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        if strategy_name.endswith("without merge_call"):
            strategy.extended._use_merge_call = lambda: False
    result, model, optimizer = recorded_fit()
    if strategy_name == "MirroredStrategy":
        unsplit, *trained = recorded_fit(split_newton_schulz=False)
        unsplit["max difference between replicas"] = replica_difference(*trained)
        result["without split"] = unsplit
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        result["max difference between replicas"] = replica_difference(model, optimizer)
        clipped = fit(weights, data, strategy.scope(), **QK_CLIP)
        result["QK-Clip"] = differences(one_device_clipped, snapshot(*clipped))
        result["QK-Clip"]["clipped heads"] = clipped_heads
        result["QK-Clip"]["max difference between replicas"] = replica_difference(*clipped)
        result["state"] = [
            {
                "path": v.path,
                "class": type(v.value).__name__,
                "devices": [c.device for c in v.value.values],
            }
            for v in optimizer.variables
        ]
    return result


def replica_difference(model, optimizer):
    """The largest difference between the two replicas' copies of any
    variable."""
    return max(
        float(np.max(np.abs(v.value.values[0].numpy() - v.value.values[1].numpy())))
        for v in model.variables + optimizer.variables
    )


def tensorflow_checkpoint_case():
    """A `.weights.h5` written by `save_weights` after `STEPS` steps of a
    custom loop under MirroredStrategy (2 logical CPU devices), loaded into
    a fresh model and optimizer built under the strategy, and into one
    built without it (one device), each trained `STEPS` more steps on the
    same batches; against `2 * STEPS` steps uninterrupted under the
    strategy, which saved the file and went on. The model is compiled
    with the optimizer: `save_weights` saves `model.optimizer`."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    weights, data = initial_weights_and_data()
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one_device = tf.distribute.get_strategy()  # the default: no distribution
    file = Path(sys.argv[2]).with_name("mirrored.weights.h5")

    def trained_in_loop(strategy, checkpoint=None):
        """A model and keras_muon.Muon built under `strategy`, from the
        initial weights or from `checkpoint`, and a function training
        them `STEPS` steps, each replica on its part of each batch."""
        with strategy.scope():
            model = transformer()
            model.set_weights(weights)
            optimizer = keras_muon.Muon(learning_rate=LEARNING_RATE)
            model.compile(optimizer=optimizer, loss=loss())
            optimizer.attach(model)
            if checkpoint:
                model.load_weights(checkpoint)  # the state waits for the build
            optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

        @tf.function
        def step(x, y):
            def replica_step(x, y):
                with tf.GradientTape() as tape:
                    # The mean over the global batch: replicas' gradients are summed.
                    value = loss_fn(y, model(x, training=True)) / (BATCH * SEQUENCE)
                grads = tape.gradient(value, model.trainable_variables)
                optimizer.apply(grads, model.trainable_variables)

            strategy.run(replica_step, args=(x, y))

        share = BATCH // strategy.num_replicas_in_sync

        def part(array, i):
            return strategy.experimental_distribute_values_from_function(
                lambda context: array[
                    i * BATCH + context.replica_id_in_sync_group * share : i * BATCH
                    + (context.replica_id_in_sync_group + 1) * share
                ]
            )

        def train():
            for i in range(STEPS):
                step(*(part(array, i) for array in data))

        return model, optimizer, train

    uninterrupted, uninterrupted_optimizer, train = trained_in_loop(mirrored)
    train()
    uninterrupted.save_weights(file)
    train()
    result = {}
    for name, strategy in [("MirroredStrategy", mirrored), ("one device", one_device)]:
        model, optimizer, train = trained_in_loop(strategy, file)
        restored_iterations = int(optimizer.iterations.numpy())
        train()
        result[name] = {
            "max weight difference": max(
                float(np.max(np.abs(a.numpy() - b.numpy())))
                for a, b in zip(model.weights, uninterrupted.weights)
            ),
            "iterations": [
                restored_iterations,
                int(optimizer.iterations.numpy()),
                int(uninterrupted_optimizer.iterations.numpy()),
            ],
            "state classes": sorted({type(v.value).__name__ for v in optimizer.variables}),
            "state devices": sorted(
                {len(getattr(v.value, "values", [v.value])) for v in optimizer.variables}
            ),
        }
        if strategy is mirrored:
            result[name]["max difference between replicas"] = replica_difference(model, optimizer)
    return result


def tensorflow_raw_variables_case():
    """Raw `tf.Variable`s (no path; `value` is a method) trained a few steps
    in a custom loop under MirroredStrategy, and on one device."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    def train(strategy):
        with strategy.scope():
            variables = [
                tf.Variable(np.linspace(-1, 1, 12).reshape(4, 3).astype("float32"), name="matrix"),
                tf.Variable(np.ones(3, "float32"), name="bias"),
            ]
            optimizer = keras_muon.Muon(learning_rate=0.1, exclude_layers=["matrix"])
            optimizer.build(variables)
        # Replicas' gradients are summed: each gives its share.
        share = 1.0 / strategy.num_replicas_in_sync

        def replica_step(scale):
            grads = [tf.fill((4, 3), scale * share), tf.fill((3,), -share)]
            optimizer.apply_gradients(zip(grads, variables))

        @tf.function
        def step(scale):
            strategy.run(replica_step, args=(scale,))

        for scale in (1.0, 2.0, 3.0):
            step(tf.constant(scale))
        return variables, optimizer

    one_device, _ = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
    mirrored, optimizer = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return {
        "max weight difference": max(
            float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(one_device, mirrored)
        ),
        "max difference between replicas": max(
            float(np.max(np.abs(v.values[0].numpy() - v.values[1].numpy()))) for v in mirrored
        ),
        "paths": [row["path"] for row in optimizer.routing_table()],
    }


def torch_case():
    import torch.multiprocessing

    weights, data = initial_weights_and_data()
    result = {}
    runs = {"plain": {}, "QK-Clip": QK_CLIP, "without split": {"split_newton_schulz": False}}
    for name, options in runs.items():
        one_device, clipped_heads = train_torch(weights, data, options=options)
        outputs = [Path(sys.argv[2]).with_suffix(f".rank{rank}.npz") for rank in range(2)]
        torch.multiprocessing.spawn(
            torch_rank, args=(2, free_port(), weights, data, outputs, options), nprocs=2
        )
        ranks = [dict(np.load(path)) for path in outputs]
        result[name] = differences(one_device, ranks[0])
        result[name]["max difference between processes"] = max(
            float(np.max(np.abs(ranks[0][k] - ranks[1][k]))) for k in ranks[0]
        )
        result[name]["clipped heads"] = clipped_heads
        result[name]["newton_schulz calls"] = [
            json.loads(path.with_suffix(".json").read_text()) for path in outputs
        ]
    result["errors under FSDP"] = errors_under_fsdp(free_port())
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def errors_under_fsdp(port):
    """What building keras_muon raises for a model under each version of
    torch FSDP (None: nothing)."""
    import torch.distributed
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp import fully_shard

    wrappers = {
        "fully_shard": fully_shard,
        "FullyShardedDataParallel": lambda model: FullyShardedDataParallel(
            model, device_id=torch.device("cpu")
        ),
    }
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    errors = {}
    try:
        for name, wrap in wrappers.items():
            model = transformer()
            wrap(model)
            optimizer = keras_muon.Muon()
            optimizer.attach(model)
            try:
                optimizer.build(model.trainable_variables)
                errors[name] = None
            except ValueError as error:
                errors[name] = str(error)
    finally:
        torch.distributed.destroy_process_group()
    return errors


def train_torch(weights, data, rank=0, world_size=1, options=None):
    """keras_muon.Muon(**options) in a torch training loop, under
    DistributedDataParallel when `world_size > 1`: each process takes its
    slice of every batch, DDP averages the gradients, and every process
    applies the same update. Returns the final `snapshot`, and the number
    of heads QK-Clip clipped in the last step (0 without it)."""
    import torch

    model = transformer()
    model.set_weights(weights)
    optimizer = keras_muon.Muon(learning_rate=LEARNING_RATE, **(options or {}))
    optimizer.attach(model)
    # QK-Clip's probes are created by `build`: before DDP registers the
    # parameters.
    optimizer.build(model.trainable_variables)
    module = model
    if world_size > 1:
        # DDP averages the gradients of these only: all of them, here.
        registered = {id(p) for p in model.parameters()}
        assert all(id(v.value) in registered for v in model.trainable_variables)
        module = torch.nn.parallel.DistributedDataParallel(model)
    torch_steps(model, optimizer, module, data, rank, world_size)
    clipped = optimizer.clipped_heads() if optimizer.qk_clip_threshold else 0
    return snapshot(model, optimizer), clipped


def torch_steps(model, optimizer, module, data, rank=0, world_size=1):
    """`STEPS` steps of `optimizer` on `model`, called through `module`
    (its DistributedDataParallel wrapper, or itself), this process on its
    slice of every batch."""
    import torch

    x, y = data
    share = BATCH // world_size
    for step in range(STEPS):
        rows = slice(step * BATCH + rank * share, step * BATCH + (rank + 1) * share)
        logits = module(torch.as_tensor(x[rows]))
        model.zero_grad()
        value = loss()(torch.as_tensor(y[rows]), logits)
        (value + sum(model.losses)).backward()  # QK-Clip's logits, if on
        grads = [v.value.grad for v in model.trainable_variables]
        optimizer.apply(grads, model.trainable_variables)


def torch_checkpoint_case():
    """A `.weights.h5` written by `save_weights` in process 0 of two under
    DistributedDataParallel after `STEPS` steps, loaded by both into fresh
    models and optimizers that train `STEPS` more steps on the same
    batches; against `2 * STEPS` steps uninterrupted in one process."""
    import torch.multiprocessing

    weights, data = initial_weights_and_data()
    model, optimizer, module = torch_model(weights)
    torch_steps(model, optimizer, module, data)
    torch_steps(model, optimizer, module, data)
    one_process = snapshot(model, optimizer)
    output = Path(sys.argv[2])
    torch.multiprocessing.spawn(
        torch_checkpoint_rank, args=(2, free_port(), weights, data, output), nprocs=2
    )
    ranks = [dict(np.load(output.with_suffix(f".rank{rank}.npz"))) for rank in range(2)]
    result = differences(one_process, ranks[0])
    result["max difference between processes"] = max(
        float(np.max(np.abs(ranks[0][k] - ranks[1][k]))) for k in ranks[0]
    )
    result["iterations"] = [ranks[i]["iterations"].tolist() for i in range(2)]
    return result


def torch_model(weights=None, world_size=1, checkpoint=None):
    """A model and keras_muon.Muon compiled with it (so that `save_weights`
    saves it), from `weights` or from `checkpoint`, built, and the module
    to call: its DistributedDataParallel wrapper when `world_size > 1`
    (made once the weights are loaded: it registers their tensors)."""
    import torch

    model = transformer()
    if weights is not None:
        model.set_weights(weights)
    optimizer = keras_muon.Muon(learning_rate=LEARNING_RATE)
    model.compile(optimizer=optimizer, loss=loss())
    optimizer.attach(model)
    if checkpoint is not None:
        model.load_weights(checkpoint)  # the state waits for the build
    optimizer.build(model.trainable_variables)
    if world_size == 1:
        return model, optimizer, model
    return model, optimizer, torch.nn.parallel.DistributedDataParallel(model)


def torch_checkpoint_rank(rank, world_size, port, weights, data, output):
    """One DDP process of `torch_checkpoint_case`: trains, process 0 saves,
    both resume from its file; writes the resumed `snapshot`, and the step
    counter once restored and once trained, beside `output`."""
    import torch.distributed

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    checkpoint = output.with_name("process0.weights.h5")
    try:
        model, optimizer, module = torch_model(weights, world_size)
        torch_steps(model, optimizer, module, data, rank, world_size)
        if rank == 0:
            model.save_weights(checkpoint)
        torch.distributed.barrier()  # the file is written
        model, optimizer, module = torch_model(world_size=world_size, checkpoint=checkpoint)
        restored = int(optimizer.iterations)
        torch_steps(model, optimizer, module, data, rank, world_size)
        arrays = snapshot(model, optimizer)
        arrays["iterations"] = np.array([restored, int(optimizer.iterations)])
        np.savez(output.with_suffix(f".rank{rank}.npz"), **arrays)
    finally:
        torch.distributed.destroy_process_group()


def torch_rank(rank, world_size, port, weights, data, outputs, options):
    """One DDP process: trains, saves its `snapshot` to `outputs[rank]`
    and the shapes of the blocks it orthogonalized beside it (.json)."""
    import torch.distributed

    calls = []
    newton_schulz = distributed.newton_schulz

    def recording_newton_schulz(x, *args):
        calls.append(list(x.shape))
        return newton_schulz(x, *args)

    distributed.newton_schulz = recording_newton_schulz
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        arrays, _ = train_torch(weights, data, rank, world_size, options)
        np.savez(outputs[rank], **arrays)
        outputs[rank].with_suffix(".json").write_text(json.dumps(calls))
    finally:
        torch.distributed.destroy_process_group()


def run_processes(case, count, tmp_path, timeout=600):
    """Runs `case` in `count` processes at once (`case:<index>,<port>...`,
    with free ports on 127.0.0.1 for them to meet); returns what each
    wrote, in order."""
    ports = ",".join(str(free_port()) for _ in range(count))
    outputs = [tmp_path / f"process{i}.json" for i in range(count)]
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, f"{case}:{i},{ports}", str(output)],
            env=dict(os.environ, KERAS_BACKEND=BACKEND),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, output in enumerate(outputs)
    ]
    logs = [process.communicate(timeout=timeout)[0] for process in processes]
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    return [json.loads(output.read_text()) for output in outputs]


def jax_process_case(option):
    """One of two JAX processes joined by `keras.distribution.initialize`
    (4 CPU devices each, gloo collectives), training under DataParallel
    and ModelParallel over the 8 devices with `fit` on a `tf.data`
    pipeline (Keras gives each process its part of every batch). Writes
    each run's `snapshot`, gathered from both processes, beside its
    output, and saves the ModelParallel model."""
    import jax
    import tensorflow as tf
    from jax.experimental import multihost_utils

    index, port, _ = map(int, option.split(","))
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}", num_processes=2, process_id=index
    )
    weights, (x, y) = initial_weights_and_data()
    devices = keras.distribution.list_devices()
    distributions = data_and_model_parallel(devices)
    output = Path(sys.argv[2])
    result = {"devices": len(devices), "processes": jax.process_count()}
    for name, distribution in distributions.items():
        with distribution.scope():
            model = transformer()
            model.set_weights(weights)
            optimizer = keras_muon.Muon(learning_rate=LEARNING_RATE, per_head=True)
            model.compile(optimizer=optimizer, loss=loss())
            model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH), verbose=0)
            arrays = {
                key: np.asarray(multihost_utils.process_allgather(value, tiled=True))
                for key, value in snapshot(model, optimizer, to_numpy=False).items()
            }
            np.savez(output.with_name(f"{output.stem}.{name}.npz"), **arrays)
            if name == "ModelParallel":
                model.save(output.with_name(f"{output.stem}.keras"))
    return result


def tensorflow_worker_case(option):
    """One of two TensorFlow workers of a `MultiWorkerMirroredStrategy`
    (`TF_CONFIG` on 127.0.0.1), training in a custom loop (Keras 3.15's
    `fit` fails under this strategy, with its own optimizers too). Writes
    its `snapshot` beside its output."""
    index, *ports = map(int, option.split(","))
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
    )
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    arrays = train_tf_loop(strategy, index)
    output = Path(sys.argv[2])
    np.savez(output.with_suffix(".npz"), **arrays)
    return {"replicas": strategy.num_replicas_in_sync}


def train_tf_loop(strategy, index=0):
    """keras_muon.Muon in a custom loop under `strategy`, this replica
    taking its part of each batch; returns the final `snapshot`."""
    import tensorflow as tf

    weights, (x, y) = initial_weights_and_data()
    replicas = strategy.num_replicas_in_sync
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    with strategy.scope():
        model = transformer()
        model.set_weights(weights)
        optimizer = keras_muon.Muon(learning_rate=LEARNING_RATE)
        optimizer.attach(model)
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                # The mean over the global batch: the replicas' gradients are summed.
                value = loss_fn(y, model(x, training=True)) / (BATCH * SEQUENCE)
            grads = tape.gradient(value, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_step, args=(x, y))

    share = BATCH // replicas
    for i in range(STEPS):
        rows = slice(i * BATCH + index * share, i * BATCH + (index + 1) * share)
        step(x[rows], y[rows])
    return snapshot(model, optimizer)


def jax_fused_case():
    """A transformer whose attention and feed-forward kernels are fused,
    read as their parts (q and a twice as wide kv, unequal: a `PartsView`;
    gate and up, equal), trained on 8 simulated devices, data parallel and
    fully sharded (per head, every block has one shape: the one-view case
    the other distributed tests cover): the largest weight
    difference of a Muon variable to one device (AdamW's normalized update
    amplifies round-off where gradients are tiny: compared elsewhere)."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    sys.path.insert(0, str(ROOT / "examples"))
    from char_transformer import FusedAttention
    from char_transformer import char_transformer
    from char_transformer import declare_fused_projections

    declare_fused_projections()
    keras_muon.register_fused_projection(
        FusedAttention,
        "qkv",
        lambda layer: keras_muon.FusedLayout(
            (keras_muon.Part("q", WIDTH, HEADS), keras_muon.Part("kv", 2 * WIDTH, 2 * HEADS))
        ),
    )

    def build():
        return char_transformer(SEQUENCE, WIDTH, DEPTH, HEADS, fused=True)

    keras.utils.set_random_seed(0)
    weights = build().get_weights()
    tokens = np.random.default_rng(0).integers(0, 256, (STEPS * BATCH, SEQUENCE + 1))
    data = (tokens[:, :-1].astype("int32"), tokens[:, 1:].astype("int32"))
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((8,), ["model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*qkv/kernel"] = (None, "model")  # each part split over the devices
    layout_map[".*attention/out/kernel"] = ("model", None)
    distributions = {
        "DataParallel": keras.distribution.DataParallel(devices=devices),
        "fully sharded": keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="model"
        ),
    }
    one_device, optimizer = fit(weights, data, build=build)
    table = optimizer.routing_table()
    result = {"parts": sorted({str(row["parts"]) for row in table if row["parts"]})}
    muon = [row["route"] == "muon" for row in table]
    for name, distribution in distributions.items():
        model, _ = fit(weights, data, distribution.scope(), build=build)
        pairs = zip(muon, one_device.trainable_variables, model.trainable_variables)
        result[name] = max(
            float(np.max(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b))))
            for is_muon, a, b in pairs
            if is_muon
        )
    return result


if __name__ == "__main__":
    case, output = sys.argv[1:]
    backend, _, option = case.partition(":")
    cases = {
        "jax": jax_case,
        "jax_layouts": jax_layouts_case,
        "jax_fused": jax_fused_case,
        "jax_checkpoint": jax_checkpoint_case,
        "jax_process": jax_process_case,
        "tensorflow": tensorflow_case,
        "tensorflow_checkpoint": tensorflow_checkpoint_case,
        "tensorflow_raw_variables": tensorflow_raw_variables_case,
        "tensorflow_worker": tensorflow_worker_case,
        "torch": torch_case,
        "torch_checkpoint": torch_checkpoint_case,
    }
    arguments = [option] if option else []
    Path(output).write_text(json.dumps(cases[backend](*arguments)))
