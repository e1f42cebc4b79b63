"""Newton–Schulz batches of blocks of one shape, and back to the variables.

A Newton–Schulz step costs a few matrix products whatever the number of
matrices in the batch, so Muon blocks of one shape go through one batched
iteration, whatever variable, attention head, RNN gate, conv group or
expert they come from. Blocks are stacked wide (a tall block as its
transpose, `MatrixView.to_wide_blocks`), so that blocks of transposed
shapes, such as the up and down projections of a feed-forward layer, share
a batch.

A batch's iteration holds a few copies of its blocks at once, so the Muon
variables are first cut into buckets (`buckets`) of at most
`ns_bucket_bytes` of blocks per device, updated one after the other
(`in_order`): the update's scratch memory is that of one bucket, whatever
the size of the model. A small model's Muon variables are one bucket.
"""

import itertools
from typing import Any
from typing import NamedTuple

import keras
from keras import ops

# `ns_bucket_bytes=None`: 128 MiB of float32 blocks per device, or one
# block where a block is larger. Far above a small model's blocks, which
# then go in one batch per shape (the fastest), and far below an 8B
# model's Muon state per device.
DEFAULT_BUCKET_BYTES = 2**27


class BlockBatch(NamedTuple):
    """The Muon variables whose wide blocks share one shape, and those
    blocks stacked in the order of `entries`; or one variable whose blocks
    are laid out whole over the devices along mesh axis `placement`."""

    entries: list
    blocks: Any  # (total blocks, rows, cols), rows <= cols, float32
    placement: Any = None


def buckets(entries, placements, budget, split_counts):
    """The Muon `entries` in buckets, lists of entries updated together: by
    wide block shape and placement (see `stack_by_shape`), in order of
    first appearance, cut into consecutive buckets of at most `budget`
    bytes of float32 blocks per device (`budget` None:
    `DEFAULT_BUCKET_BYTES`). Each device holds 1/`split_counts[i]` of
    entry i's blocks (`distributed.split_counts`): a replicated variable's
    blocks are all on every device, and so are, under data parallelism,
    their orthogonalized blocks. A variable is not cut: one with more
    blocks than a bucket holds is a bucket of its own. Where no group needs
    more than one bucket, all `entries` are one bucket."""
    groups = {}
    for entry, placement, count in zip(entries, placements, split_counts):
        key = entry.state.route.view.wide_shape, placement
        groups.setdefault(key, []).append((entry, count))
    cut = []
    for ((rows, cols), _), group in groups.items():
        capacity = max(1, (budget or DEFAULT_BUCKET_BYTES) // (4 * rows * cols))
        bucket, size = [], 0
        for entry, count in group:
            blocks = entry.state.route.view.num_blocks / count  # on each device
            if bucket and size + blocks > capacity:
                cut.append(bucket)
                bucket, size = [], 0
            bucket.append(entry)
            size += blocks
        cut.append(bucket)
    # Nothing to cut: one bucket, so that a small model's update is one
    # program of independent batches, and on torch each phase one call.
    return cut if len(cut) > len(groups) else [entries]


def check_bucket_bytes(budget, variables, views):
    """Raises a ValueError if a Muon block of `variables` (read by `views`,
    None for AdamW) has more float32 bytes than `ns_bucket_bytes=budget`."""
    if budget is None:
        return
    for variable, view in zip(variables, views):
        if view is not None and 4 * view.d_in * view.d_out > budget:
            raise ValueError(
                f"`ns_bucket_bytes={budget}` is smaller than one Muon block of "
                f"{variable.path}, {view.d_in}×{view.d_out} float32 "
                f"({4 * view.d_in * view.d_out} bytes). Newton–Schulz "
                "orthogonalizes whole blocks, so each device needs at least one "
                "block's bytes at a time: raise `ns_bucket_bytes`, leave it None "
                "(128 MiB, or one block where a block is larger), or send that "
                "layer to AdamW with `exclude_layers`."
            )


def one_after_another(buckets, previous):
    """Yields each of `buckets` once the variables of the one before it
    (first, of the entries `previous`) hold their new values (`in_order`);
    a single bucket as it is."""
    if len(buckets) == 1:
        yield from buckets
        return
    for bucket in buckets:
        yield in_order(bucket, previous)
        previous = bucket


def in_order(entries, previous):
    """`entries` with their gradients made to wait for the new values of the
    variables of the `previous` entries: one bucket's update runs after the
    one before it, so that their scratch memory is not held at once (XLA
    and TensorFlow graphs would otherwise run them together). Eager torch
    runs them in order anyway."""
    backend = keras.backend.backend()
    if not previous or backend == "torch":
        return entries
    done = [ops.convert_to_tensor(entry.variable) for entry in previous]
    grads = [entry.gradient for entry in entries]
    if backend == "jax":
        # A factor of exactly 1 computed from the new values: XLA keeps a
        # data dependency (an optimization barrier it may schedule around).
        # No value, not even NaN, is greater than inf.
        never = ops.any(ops.stack([ops.max(ops.cast(d, "float32")) > float("inf") for d in done]))
        grads = [g * ops.cast(ops.logical_not(never), g.dtype) for g in grads]
    else:
        import tensorflow as tf

        with tf.control_dependencies(done):
            grads = [tf.identity(g) for g in grads]
    return [entry._replace(gradient=g) for entry, g in zip(entries, grads)]


def stack_by_shape(entries, wide_blocks, placements=None):
    """One `BlockBatch` per shape among `wide_blocks` (one tensor per entry,
    from `MatrixView.to_wide_blocks`), in order of first appearance; and one
    per entry with a `placement` (not None), which stays where it is."""
    groups, placed = {}, []
    for entry, blocks, placement in zip(entries, wide_blocks, placements or [None] * len(entries)):
        if placement is None:
            groups.setdefault(tuple(blocks.shape[1:]), []).append((entry, blocks))
        else:
            placed.append(BlockBatch([entry], blocks, placement))
    # Concatenated even when alone: a copy in one layout whatever the view
    # (a transposed block is a strided view on torch, and matmuls round
    # differently on one).
    return [
        BlockBatch([entry for entry, _ in group], ops.concatenate([b for _, b in group]))
        for group in groups.values()
    ] + placed


def unstack(batch, stacked):
    """`(entry, blocks)` for each variable of `batch`, its blocks
    `(num_blocks, d_in, d_out)` cut from `stacked`, which is stacked as
    `batch.blocks` is (Newton–Schulz's output)."""
    views = [entry.state.route.view for entry in batch.entries]
    pieces = _split(stacked, [view.num_blocks for view in views])
    for entry, view, blocks in zip(batch.entries, views, pieces):
        yield entry, view.from_wide_blocks(blocks)


def _split(x, sizes):
    """`x` cut along its first axis into consecutive pieces of `sizes`."""
    if len(sizes) == 1:
        return [x]
    if keras.backend.backend() == "torch":
        # One operation for all the pieces, where eager slices launch one each.
        return x.split(sizes)
    starts = itertools.accumulate(sizes[:-1], initial=0)
    return [x[start : start + size] for start, size in zip(starts, sizes)]
