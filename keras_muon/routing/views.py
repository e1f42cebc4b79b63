"""How a variable is read as `(d_in, d_out)` matrices, and where it goes.

A Keras layer stores its weight matrix in a layout of its own: a `Conv2D`
kernel is `(kh, kw, c_in/groups, c_out)`, an LSTM kernel concatenates four
gates, a `MultiHeadAttention` projection is 3-D. A `MatrixView` says how to
reshape and transpose such a variable into `num_blocks` matrices of shape
`(d_in, d_out)`, in the layer's own sense: `d_in` is the side it reads.
A `PartsView` reads a variable that fuses matrices of different shapes
(`[q | k | v | mlp_in]`) as sections of one axis, each with its own
`MatrixView`. A `Route` sends a variable to Muon with its view, or to
AdamW, with the reason either way.
"""

import dataclasses
import itertools
import math

from keras import ops


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A variable read as a stack of `(d_in, d_out)` matrices.

    The variable is reshaped to `split_shape`, transposed by `perm` (block,
    input and output axes, in that order) and reshaped to
    `(num_blocks, d_in, d_out)`. Build one with `MatrixView.from_axes`;
    `axes` keeps its `(blocks, inputs, outputs)` axes of `split_shape`.
    """

    shape: tuple
    split_shape: tuple
    perm: tuple
    num_blocks: int
    d_in: int
    d_out: int
    axes: tuple = ()

    @classmethod
    def from_axes(cls, shape, inputs, outputs, blocks=(), split_shape=None):
        """Views `shape` with the given input, output and block axes.

        Args:
            shape: Shape of the variable.
            inputs: Axes whose product is `d_in` (the side the layer reads).
            outputs: Axes whose product is `d_out`.
            blocks: Axes that index independent matrices (attention heads,
                RNN gates, conv groups).
            split_shape: Optional shape to reshape the variable to first, so
                that one stored axis can hold several logical ones (e.g. an
                LSTM kernel `(i, 4·u)` read as `(i, 4, u)`). The axes above
                refer to it.

        Returns:
            A `MatrixView`.
        """
        shape = tuple(int(d) for d in shape)
        split_shape = tuple(int(d) for d in (split_shape or shape))
        if math.prod(split_shape) != math.prod(shape):
            raise ValueError(
                f"split_shape {split_shape} does not have the size of the variable shape {shape}"
            )
        inputs, outputs, blocks = tuple(inputs), tuple(outputs), tuple(blocks)
        perm = blocks + inputs + outputs
        if sorted(perm) != list(range(len(split_shape))):
            raise ValueError(
                f"blocks {blocks}, inputs {inputs} and outputs {outputs} must "
                f"name every axis of shape {split_shape} exactly once"
            )
        if not inputs or not outputs:
            raise ValueError("A matrix view needs input and output axes")

        def size(axes):
            return math.prod(split_shape[a] for a in axes)

        # Axes of size 1 do not move data: skip transposes that only move them.
        moved = [a for a in perm if split_shape[a] != 1]
        if moved == sorted(moved):
            perm = tuple(range(len(split_shape)))
        return cls(
            shape=shape,
            split_shape=split_shape,
            perm=perm,
            num_blocks=size(blocks),
            d_in=size(inputs),
            d_out=size(outputs),
            axes=(blocks, inputs, outputs),
        )

    @classmethod
    def dense(cls, shape):
        """A `(d_in, d_out)` variable as one matrix, as a `Dense` kernel."""
        return cls.from_axes(shape, inputs=(0,), outputs=(1,))

    @property
    def matrix_shape(self):
        return (self.d_in, self.d_out)

    @property
    def parts(self):
        """The views of the variable's sections (`PartsView`): itself."""
        return (self,)

    def split(self, x):
        """`x` of the variable's shape as its sections: `[x]`."""
        return [x]

    def join(self, sections):
        """The inverse of `split`."""
        return sections[0]

    @property
    def _transposes(self):
        return self.perm != tuple(range(len(self.perm)))

    def to_blocks(self, x):
        """`x` of the variable's shape as `(num_blocks, d_in, d_out)`."""
        if self._transposes:
            x = ops.transpose(ops.reshape(x, self.split_shape), self.perm)
        return ops.reshape(x, (self.num_blocks, self.d_in, self.d_out))

    def blocks_layout(self, layout):
        """The layout of `to_blocks`'s `(num_blocks, d_in, d_out)` for a
        variable laid out as `layout` (a mesh axis name, or None, per axis of
        the variable, as `keras.distribution.TensorLayout.axes`).

        Each of the three is sharded by the mesh axis of its first axis of
        more than one element, so that every device holds whole rows of
        it; None where nothing shards it. Returns None where the layout
        cannot be carried over: a sharded axis that `split_shape` splits, or
        that is not the first of its group.
        """
        parts, split_axes = [], iter(enumerate(self.split_shape))
        for size in self.shape:  # the axes of `split_shape` of each axis
            axes, product = [], 1
            while product < size or not axes:
                axis, length = next(split_axes)
                axes.append(axis)
                product *= length
            parts.append(axes)
        sharded = {}
        for variable_axis, mesh_axis in enumerate(layout):
            if mesh_axis is not None:
                if len(parts[variable_axis]) != 1:
                    return None
                sharded[parts[variable_axis][0]] = mesh_axis
        blocks_layout = []
        for group in self.axes:
            group = [a for a in group if self.split_shape[a] > 1]
            on = [a for a in group if a in sharded]
            if on and on != group[:1]:
                return None
            blocks_layout.append(sharded[on[0]] if on else None)
        return tuple(blocks_layout)

    @property
    def is_tall(self):
        """Whether a block has more rows (`d_in`) than columns (`d_out`)."""
        return self.d_in > self.d_out

    @property
    def wide_shape(self):
        """The shape of a block in `to_wide_blocks`: `(rows, cols)`, rows <= cols."""
        return (min(self.d_in, self.d_out), max(self.d_in, self.d_out))

    def to_wide_blocks(self, x):
        """`to_blocks(x)` in float32, each block with no more rows than
        columns (tall blocks transposed), so that blocks of transposed
        shapes share one Newton–Schulz batch."""
        blocks = ops.cast(self.to_blocks(x), "float32")
        return ops.swapaxes(blocks, -1, -2) if self.is_tall else blocks

    def from_wide_blocks(self, blocks):
        """The inverse of `to_wide_blocks`, but for the dtype:
        `(num_blocks, d_in, d_out)` blocks."""
        return ops.swapaxes(blocks, -1, -2) if self.is_tall else blocks

    def from_blocks(self, blocks):
        """The inverse of `to_blocks`."""
        if self._transposes:
            permuted = tuple(self.split_shape[a] for a in self.perm)
            blocks = ops.reshape(blocks, permuted)
            inverse = tuple(self.perm.index(a) for a in range(len(self.perm)))
            blocks = ops.transpose(blocks, inverse)
        return ops.reshape(blocks, self.shape)


@dataclasses.dataclass(frozen=True)
class PartsView:
    """A variable read as several matrices whose blocks differ in shape:
    consecutive sections of one of its axes, each read by its own
    `MatrixView` (`parts`), whose blocks are orthogonalized as any others.

    Build one with `PartsView.of`. Where every section's blocks have one
    shape, a single `MatrixView` with a block axis reads the variable
    faster; `routing.fused` builds that instead.
    """

    shape: tuple
    axis: int
    sizes: tuple
    parts: tuple

    @classmethod
    def of(cls, shape, axis, parts):
        """Views `shape` as consecutive sections of `axis`, section i of the
        shape of `parts[i]`, a `MatrixView`. Raises a ValueError if the
        sections do not tile the variable."""
        shape = tuple(int(d) for d in shape)
        sizes = tuple(part.shape[axis] for part in parts)
        for part in parts:
            expected = shape[:axis] + (part.shape[axis],) + shape[axis + 1 :]
            if part.shape != expected:
                raise ValueError(
                    f"a part of shape {part.shape} is no section of {shape} on axis {axis}"
                )
        if sum(sizes) != shape[axis]:
            raise ValueError(f"sections {sizes} do not add up to axis {axis} of shape {shape}")
        return cls(shape, axis, sizes, tuple(parts))

    @property
    def num_blocks(self):
        return sum(part.num_blocks for part in self.parts)

    def split(self, x):
        """`x` of the variable's shape as its sections, one per part."""
        starts = itertools.accumulate(self.sizes[:-1], initial=0)
        index = (slice(None),) * self.axis
        return [x[index + (slice(start, start + size),)] for start, size in zip(starts, self.sizes)]

    def join(self, sections):
        """The inverse of `split`."""
        return ops.concatenate(sections, axis=self.axis)

    def to_blocks(self, x):
        """Each part's `to_blocks` of its section of `x`: a list."""
        return [part.to_blocks(s) for part, s in zip(self.parts, self.split(x))]

    def from_blocks(self, blocks):
        """The inverse of `to_blocks`."""
        return self.join([part.from_blocks(b) for part, b in zip(self.parts, blocks)])

    def to_wide_blocks(self, x):
        """Each part's `to_wide_blocks` of its section of `x`: a list."""
        return [part.to_wide_blocks(s) for part, s in zip(self.parts, self.split(x))]

    def blocks_layout(self, layout):
        """None: the sections of a sharded variable are not laid out as
        whole blocks (see `MatrixView.blocks_layout`)."""
        return None


def wide_block(view, x, index):
    """Block `index` of `x`, counted over the parts of `view`, wide (as
    `MatrixView.to_wide_blocks`)."""
    for part, section in zip(view.parts, view.split(x)):
        if index < part.num_blocks:
            return part.to_wide_blocks(section)[index]
        index -= part.num_blocks
    raise IndexError(f"block {index} past the {view.num_blocks} blocks of the view")


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a variable is optimized: Muon with `view`, or AdamW if None.

    `parts` names the logical matrices a fused kernel is read as,
    `((name, (d_in, d_out), blocks), ...)`, in the order of its blocks;
    empty for a variable that holds one kind of matrix.
    """

    view: MatrixView | PartsView | None
    reason: str
    parts: tuple = ()

    @property
    def name(self):
        return "adamw" if self.view is None else "muon"
