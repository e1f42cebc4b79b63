"""Data parallelism: who the replicas are, and how they share the work.

Under data parallelism every replica holds the same Muon momentums and
would orthogonalize every block. Instead, the blocks of a batch are split
into equal shares, one per replica (zero blocks pad the batch to a multiple
of the number of replicas: msign of zero is zero); each replica runs
Newton–Schulz on its share and the replicas exchange the results, so that
each computes `1/N` of the work and all end with the same update:

- `keras.distribution` (JAX): `shard_map` inside the compiled step, over
  every device of the mesh;
- `tf.distribute.MirroredStrategy`: an all-gather between replicas, or,
  where the strategy updates variables through `merge_call`, two passes
  over the replicas (`backends.tf_distribute`);
- torch: an all-gather over the default process group, when one is
  initialized (DistributedDataParallel).

This module also answers the questions about the strategy in use that the
rest of the package asks (`tf_strategy`, `torch_process_count`), takes
the max of QK-Clip's logits over replicas, and refuses torch FSDP.
"""

import math
import sys

import keras
from keras import ops

from keras_muon.update.newton_schulz import newton_schulz


def orthogonalize(blocks, schedule, dtype=None, split=True, placement=None):
    """`newton_schulz(blocks, schedule, dtype)`, with the blocks split among
    the data-parallel replicas when `split` is true and there are several;
    or, for blocks laid out by block over the devices (`placement`, see
    `placements`), where they are."""
    if placement is not None:
        return _jax_in_place(blocks, schedule, dtype, placement)
    if split:
        backend = keras.backend.backend()
        if backend == "jax":
            return _jax_split(blocks, schedule, dtype)
        if backend == "tensorflow":
            return _tf_split(blocks, schedule, dtype)
        if backend == "torch":
            return _torch_split(blocks, schedule, dtype)
    return newton_schulz(blocks, schedule, dtype)


def share(blocks, replica, replicas):
    """Replica `replica`'s share of `blocks` (stacked on axis 0), out of
    `replicas` equal shares of the blocks padded with zero blocks."""
    size = -(-blocks.shape[0] // replicas)
    padded = _padded(blocks, size * replicas)
    return ops.slice(padded, [replica * size, 0, 0], [size, *blocks.shape[1:]])


def _padded(blocks, count):
    """`blocks` with zero blocks appended up to `count` (on their device)."""
    missing = count - blocks.shape[0]
    if missing == 0:
        return blocks
    return ops.pad(blocks, [[0, missing], [0, 0], [0, 0]])


def _jax_split(blocks, schedule, dtype):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    distribution = keras.distribution.distribution()
    devices = 1 if distribution is None else math.prod(distribution.device_mesh.shape)
    if devices < 2:
        return newton_schulz(blocks, schedule, dtype)
    mesh = distribution.device_mesh
    # Every device of the mesh takes a share, those of the model axis too:
    # they would otherwise orthogonalize the same blocks.
    axes = tuple(mesh.axis_names)
    count = blocks.shape[0]
    size = -(-count // devices)

    def orthogonalize_share(mine):
        first = jax.lax.axis_index(axes) * size
        return _unless_padding(jax, mine, first < count, schedule, dtype)

    padded = _padded(blocks, size * devices)
    if isinstance(distribution, keras.distribution.DataParallel):
        # Replicated, as the update computed it: otherwise XLA shards that
        # computation too, and moves its pieces by all-to-alls. (Under
        # ModelParallel the blocks arrive sharded as their variables, and
        # go to their shares without being gathered whole anywhere.)
        padded = jax.lax.with_sharding_constraint(
            padded, NamedSharding(mesh.backend_mesh, PartitionSpec())
        )
    # The result stays split among the devices; XLA gathers it where the
    # update needs it (all of it under DataParallel).
    split = _shard_map(jax)(
        orthogonalize_share,
        mesh=mesh.backend_mesh,
        in_specs=PartitionSpec(axes),
        out_specs=PartitionSpec(axes),
    )
    return split(padded)[:count]


def placements(entries):
    """For each `Entry` of a Muon variable: under `keras.distribution`
    (JAX), the mesh axes `(blocks, rows, cols)` of its wide blocks where its
    layout splits them among the devices by block, along mesh axis
    `blocks` (an expert bank sharded on its expert axis), each block whole
    on a device or split on one more mesh axis (`rows` or `cols`, the
    other None); None for any other variable. Newton–Schulz then runs
    where the blocks are: with no communication, or with one all-to-all
    each way among the devices that share a block."""
    distribution = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    return [None if distribution is None else _placement(entry, distribution) for entry in entries]


def split_counts(entries):
    """For each `Entry` of a Muon variable: over how many devices its layout
    splits it (`keras.distribution`, JAX), so that each holds that share of
    its blocks; 1 where every device holds all of it (replicated, data
    parallel, other backends)."""
    distribution = keras.distribution.distribution() if keras.backend.backend() == "jax" else None
    if distribution is None:
        return [1] * len(entries)
    mesh = distribution.device_mesh
    sizes = _axis_sizes(mesh)
    counts = []
    for entry in entries:
        layout = getattr(entry.variable, "_layout", None)
        axes = () if layout is None else [a for a in layout.axes if a is not None]
        counts.append(math.prod(sizes[a] for a in axes))
    return counts


def _axis_sizes(mesh):
    """`{axis name: number of devices}` of a `keras.distribution.DeviceMesh`."""
    return dict(zip(mesh.axis_names, mesh.shape))


def _placement(entry, distribution):
    layout = getattr(entry.variable, "_layout", None)
    view = entry.state.route.view
    axes = None if layout is None else view.blocks_layout(layout.axes)
    if axes is None or axes[0] is None:
        return None
    within = axes[:0:-1] if view.is_tall else axes[1:]  # rows and cols of a wide block
    if sum(a is not None for a in within) > 1 or axes[0] in within:
        return None
    placement = (axes[0], *within)
    # shard_map takes whole shares: each axis a multiple of its devices.
    sizes = _axis_sizes(distribution.device_mesh)
    shape = (view.num_blocks, *view.wide_shape)
    if any(a is not None and n % sizes[a] for a, n in zip(placement, shape)):
        return None
    return placement


def _jax_in_place(blocks, schedule, dtype, placement):
    import jax
    from jax.sharding import PartitionSpec

    mesh = keras.distribution.distribution().device_mesh
    split = [(axis, name) for axis, name in enumerate(placement) if axis and name is not None]

    def where_they_are(mine):
        if not split:
            return newton_schulz(mine, schedule, dtype)
        (axis, name), count = split[0], mine.shape[0]
        devices = _axis_sizes(mesh)[name]
        # An all-to-all among the devices that share these blocks gives each
        # 1/devices of them whole (zero blocks pad their number), and
        # another brings the results back to the rows or columns it holds.
        # (The barrier keeps the padded blocks one operand: XLA:CPU would
        # cut them into pieces of other layouts, which its all-to-all refuses.)
        size = -(-count // devices)
        padded = jax.lax.optimization_barrier(_padded(mine, size * devices))
        whole = jax.lax.all_to_all(padded, name, 0, axis, tiled=True)
        first = jax.lax.axis_index(name) * size
        orthogonal = _unless_padding(jax, whole, first < count, schedule, dtype)
        return jax.lax.all_to_all(orthogonal, name, axis, 0, tiled=True)[:count]

    spec = PartitionSpec(*placement)
    in_place = _shard_map(jax)(
        where_they_are, mesh=mesh.backend_mesh, in_specs=spec, out_specs=spec
    )
    return in_place(blocks)


def _unless_padding(jax, share, has_blocks, schedule, dtype):
    """`newton_schulz` of a device's `share` of blocks; a share of padding
    only (`has_blocks` false: fewer blocks than devices) is skipped, so that
    the padding costs no time where devices share a host."""
    return jax.lax.cond(
        has_blocks,
        lambda x: newton_schulz(x, schedule, dtype),
        lambda x: x,  # zeros
        share,
    )


def _shard_map(jax):
    """`jax.shard_map`, or its experimental form in JAX versions before it."""
    if hasattr(jax, "shard_map"):
        return lambda f, **kwargs: jax.shard_map(f, check_vma=False, **kwargs)
    from jax.experimental.shard_map import shard_map

    return lambda f, **kwargs: shard_map(f, check_rep=False, **kwargs)


def _tf_split(blocks, schedule, dtype):
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    # None in a cross-replica context: `tf_distribute` splits there.
    if context is None or context.num_replicas_in_sync < 2:
        return newton_schulz(blocks, schedule, dtype)
    replicas = context.num_replicas_in_sync
    mine = newton_schulz(share(blocks, context.replica_id_in_sync_group, replicas), schedule, dtype)
    return context.all_gather(mine, axis=0)[: blocks.shape[0]]


def _torch_split(blocks, schedule, dtype):
    processes = torch_process_count()
    if processes < 2:
        return newton_schulz(blocks, schedule, dtype)
    import torch
    import torch.distributed as dist

    mine = newton_schulz(share(blocks, dist.get_rank(), processes), schedule, dtype)
    gathered = [torch.empty_like(mine) for _ in range(processes)]
    dist.all_gather(gathered, mine.contiguous())
    return torch.cat(gathered)[: blocks.shape[0]]


def torch_process_count():
    """The size of torch's default process group (1 without one)."""
    if keras.backend.backend() != "torch" or "torch.distributed" not in sys.modules:
        return 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def max_over_replicas(x):
    """`x`'s elementwise max over data-parallel replicas, where each
    replica sees only its share of the batch (tf.distribute, torch
    distributed); `keras.distribution` computes on the global batch."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            # ReduceOp has no MAX: gather every replica's, then reduce.
            return ops.max(context.all_gather(x[None], axis=0), axis=0)
    elif torch_process_count() > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def tf_strategy():
    """The `tf.distribute` strategy in scope on TensorFlow, or None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf.distribute.get_strategy() if tf.distribute.has_strategy() else None


def is_mirrored(strategy):
    """Whether `strategy` keeps a copy of every variable on every replica:
    `MirroredStrategy`, and `MultiWorkerMirroredStrategy` across workers."""
    import tensorflow as tf

    mirrored = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    return isinstance(strategy, mirrored)


def reject_fsdp_parameters(model):
    """Raises if torch FSDP has replaced `model`'s torch parameters, by
    shards (`fully_shard`) or by one flat parameter
    (`FullyShardedDataParallel`): Keras layers compute with their own
    variables, so each process would silently train its own copy."""
    if model is None or keras.backend.backend() != "torch":
        return
    # A program using FSDP has imported the modules of both types.
    fsdp_types = tuple(
        getattr(sys.modules[module], name)
        for module, name in [
            ("torch.distributed.tensor", "DTensor"),
            ("torch.distributed.fsdp", "FlatParameter"),
        ]
        if module in sys.modules
    )
    if any(isinstance(p, fsdp_types) for p in model.parameters()):
        raise ValueError(
            "This model's torch parameters were replaced by torch FSDP. "
            "Keras layers compute with their own variables, not FSDP's "
            "shards or flat parameters, so processes would not be "
            "synchronized. Use torch DistributedDataParallel, or the JAX "
            "backend's keras.distribution.ModelParallel to shard."
        )
