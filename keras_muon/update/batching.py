"""One Newton–Schulz batch per block shape, and back to the variables.

A Newton–Schulz step costs a few matrix products whatever the number of
matrices in the batch, so all Muon blocks of one shape go through one
batched iteration, whatever variable, attention head, RNN gate, conv group
or expert they come from. Blocks are stacked wide (a tall block as its
transpose, `MatrixView.to_wide_blocks`), so that blocks of transposed
shapes, such as the up and down projections of a feed-forward layer, share
a batch.
"""

import itertools
from typing import Any
from typing import NamedTuple

import keras
from keras import ops


class BlockBatch(NamedTuple):
    """The Muon variables whose wide blocks share one shape, and those
    blocks stacked in the order of `entries`; or one variable whose blocks
    are laid out whole over the devices along mesh axis `placement`."""

    entries: list
    blocks: Any  # (total blocks, rows, cols), rows <= cols, float32
    placement: Any = None


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
