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
    blocks stacked in the order of `entries` (entry i's part `parts[i]`
    of its view, for a variable read as several parts); or variables whose
    blocks the devices hold by block (`placement`, see
    `distributed.placements`), their blocks taken in turn (block j of
    each entry, then block j + 1), so that each device keeps its own."""

    entries: list
    blocks: Any  # (total blocks, rows, cols), rows <= cols, float32
    placement: Any = None
    parts: list | None = None


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
        key = tuple(part.wide_shape for part in entry.state.route.view.parts), placement
        groups.setdefault(key, []).append((entry, count))
    cut = []
    for (shapes, _), group in groups.items():
        largest = max(rows * cols for rows, cols in shapes)
        capacity = max(1, (budget or DEFAULT_BUCKET_BYTES) // (4 * largest))
        bucket, size = [], 0
        for entry, count in group:
            parts = entry.state.route.view.parts
            # On each device, in blocks of the largest shape.
            blocks = sum(p.num_blocks * p.d_in * p.d_out for p in parts) / largest / count
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
        view = None if view is None else max(view.parts, key=lambda p: p.d_in * p.d_out)
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
    """One `BlockBatch` per shape among `wide_blocks` (per entry, its
    view's `to_wide_blocks`: a tensor, or a list with one per part), in
    order of first appearance; and one per shape and `placement` (not
    None) for the entries whose blocks stay where they are."""
    groups, placed = {}, {}
    for entry, blocks, placement in zip(entries, wide_blocks, placements or [None] * len(entries)):
        if placement is not None:
            placed.setdefault((tuple(blocks.shape), placement), []).append((entry, blocks))
            continue
        for part, part_blocks in enumerate(blocks if isinstance(blocks, list) else [blocks]):
            groups.setdefault(tuple(part_blocks.shape[1:]), []).append((entry, part, part_blocks))
    # Concatenated even when alone: a copy in one layout whatever the view
    # (a transposed block is a strided view on torch, and matmuls round
    # differently on one).
    return [
        BlockBatch(
            [entry for entry, _, _ in group],
            ops.concatenate([b for _, _, b in group]),
            parts=[part for _, part, _ in group],
        )
        for group in groups.values()
    ] + [
        BlockBatch([entry for entry, _ in group], _in_turn([b for _, b in group]), placement)
        for (_, placement), group in placed.items()
    ]


def _in_turn(blocks):
    """The `(n, rows, cols)` tensors `blocks` as one, their blocks taken in
    turn: block j of each, then block j + 1. Each device's blocks of the
    one are those it holds of each (laid out by block), where a
    concatenation would move them."""
    if len(blocks) == 1:
        return blocks[0]
    return ops.reshape(ops.stack(blocks, axis=1), (-1, *blocks[0].shape[1:]))


def _out_of_turn(blocks, count):
    """The inverse of `_in_turn`: the `count` tensors whose blocks it took
    in turn."""
    if count == 1:
        return [blocks]
    taken = ops.reshape(blocks, (-1, count, *blocks.shape[1:]))
    return [taken[:, i] for i in range(count)]


def by_variable(batches, orthogonal):
    """`(entry, blocks)` for each variable of `batches`, `blocks` a list
    with the `(num_blocks, d_in, d_out)` blocks of each part of its view,
    cut from `orthogonal` (Newton–Schulz's output of each batch, stacked
    as `batch.blocks` is). A variable of several parts comes once all its
    parts have."""
    pending = {}
    for batch, stacked in zip(batches, orthogonal):
        parts = batch.parts or [0] * len(batch.entries)
        views = [entry.state.route.view.parts[p] for entry, p in zip(batch.entries, parts)]
        if batch.placement is None:
            pieces = _split(stacked, [view.num_blocks for view in views])
        else:
            pieces = _out_of_turn(stacked, len(views))
        for entry, part, view, blocks in zip(batch.entries, parts, views, pieces):
            count = len(entry.state.route.view.parts)
            if count == 1:
                yield entry, [view.from_wide_blocks(blocks)]
                continue
            received = pending.setdefault(id(entry), [None] * count)
            received[part] = view.from_wide_blocks(blocks)
            if all(b is not None for b in received):
                yield entry, pending.pop(id(entry))


def _split(x, sizes):
    """`x` cut along its first axis into consecutive pieces of `sizes`."""
    if len(sizes) == 1:
        return [x]
    if keras.backend.backend() == "torch":
        # One operation for all the pieces, where eager slices launch one each.
        return x.split(sizes)
    starts = itertools.accumulate(sizes[:-1], initial=0)
    return [x[start : start + size] for start, size in zip(starts, sizes)]
