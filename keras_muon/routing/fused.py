"""Fused projections read as the logical matrices they hold.

Many layers compute several projections with one kernel: `[q | k | v]`,
`[gate | up]`, the chunks of an adaptive norm's modulation, `[W_o ;
W_mlp_out]` on the input side. Orthogonalized whole, the part with the
largest gradient takes the step and the others are starved; keras_muon
orthogonalizes each part on its own, and each head of it with
`per_head=True`.

A declaration names the layer that owns the fused projection and the
attribute holding it (`register_fused_projection(WindowAttention, "qkv",
...)`), and a function of that layer giving the `FusedLayout`: the parts,
their heads, and how they lie on the kernel's output (or input) side.
The kernel's own rule (Dense, EinsumDense, convolution) reads it as one
matrix; `split_route` reads it as its parts, and raises a ValueError when
the declared layout does not fit the kernel.
"""

import dataclasses
import fnmatch
import math
import warnings

from keras import ops

from keras_muon.arguments import layer_rule
from keras_muon.registry import LayerRegistry
from keras_muon.routing.keras_layers import route_by_layer
from keras_muon.routing.views import MatrixView
from keras_muon.routing.views import PartsView
from keras_muon.routing.views import Route

ORDERS = ("part_major", "head_major", "interleaved")
SIDES = ("output", "input")


@dataclasses.dataclass(frozen=True)
class Part:
    """One logical matrix of a fused projection.

    Attributes:
        name: What the table calls it (`"q"`, `"gate"`, `"shift_msa"`).
        size: Its width on the fused side, or None for an equal share of
            what the parts of the layout without a size leave.
        heads: The number of heads it has (1: none); its head dim is
            `size / heads`.
    """

    name: str
    size: int | None = None
    heads: int = 1


@dataclasses.dataclass(frozen=True)
class FusedLayout:
    """How the parts of a fused projection lie on one side of its kernel.

    Attributes:
        parts: The `Part`s, in the order they lie.
        order: `"part_major"`: each part a section of the side, its heads
            consecutive within it (`[q_1..q_H | k_1..k_H | v_1..v_H]`);
            `"head_major"`: head by head, each head's parts consecutive
            (`[q_1 k_1 v_1 | q_2 k_2 v_2 | ...]`: equal parts with equal
            heads); `"interleaved"`: element by element (`gate` at even
            columns, `up` at odd ones: equal parts without heads).
        side: `"output"` (the columns the layer writes) or `"input"` (the
            rows it reads, as in `linear2(concat([attention, mlp]))`).
    """

    parts: tuple
    order: str = "part_major"
    side: str = "output"

    def __post_init__(self):
        parts = tuple(self.parts)
        if not parts or not all(isinstance(p, Part) for p in parts):
            raise ValueError(
                f"`parts` must be a non-empty sequence of `Part`. Received: {self.parts!r}"
            )
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"Each part needs a name of its own. Received: {names}")
        if self.order not in ORDERS:
            raise ValueError(f"`order` must be one of {ORDERS}. Received: order={self.order!r}")
        if self.side not in SIDES:
            raise ValueError(f"`side` must be one of {SIDES}. Received: side={self.side!r}")
        object.__setattr__(self, "parts", parts)

    @classmethod
    def equal(cls, names, heads=1, order="part_major", side="output"):
        """Parts of one size, each with `heads` heads."""
        return cls(tuple(Part(n, heads=heads) for n in names), order, side)


def register_fused_projection(layer_type, attribute, layout):
    """Declares that `layer_type` (and subclasses) holds, in its attribute
    `attribute`, a `Dense`, `EinsumDense` or convolution whose kernel fuses
    several logical matrices.

    Args:
        layer_type: The `keras.layers.Layer` subclass that owns the fused
            layer (it knows the head counts).
        attribute: The name of its attribute holding the fused layer, a
            dotted path to it (`"linear_start.dense"`, `"block.layers.1"`),
            or, for a functional model, a pattern of layer names
            (`"*_conv_exp"`).
        layout: `layout(layer) -> FusedLayout`, called with the owning
            layer when the optimizer is built; None where this layer's
            configuration does not fuse.

    Example:

    ```python
    keras_muon.register_fused_projection(
        MyAttention,
        "qkv",  # Dense(d, 3·d), [q | k | v], each num_heads heads
        lambda layer: keras_muon.FusedLayout.equal("qkv", heads=layer.num_heads),
    )
    ```
    """
    if not callable(layout):
        raise ValueError(
            "`layout` must be a function of the layer that returns a FusedLayout or "
            f"None (`lambda layer: FusedLayout(...)`). Received: {layout!r}"
        )
    layer_rule(layer_type, layout)
    if not isinstance(attribute, str) or not attribute:
        raise ValueError(f"`attribute` must be an attribute name. Received: {attribute!r}")
    FUSED_PROJECTIONS.register(layer_type, {**_declared(layer_type), attribute: layout})


class _Declarations(LayerRegistry):
    """Per layer type, `{attribute: layout function}`; and which of them a
    library declared (`defaults`), whose layers another version may not
    have."""

    def __init__(self):
        super().__init__()
        self.defaults = set()

    def register(self, layer_type, attributes):
        self._rules[layer_type] = attributes

    def register_defaults(self, rules):
        """Declares each attribute of `rules` (`{layer type: {attribute:
        layout}}`) that has no declaration yet."""
        for layer_type, attributes in rules.items():
            declared = self._rules.get(layer_type, {})
            self.defaults.update((layer_type, a) for a in attributes if a not in declared)
            self._rules[layer_type] = {**attributes, **declared}


FUSED_PROJECTIONS = _Declarations()


def _declared(layer_type):
    return dict(FUSED_PROJECTIONS._rules.get(layer_type, {}))


def fused_kernels(model):
    """`{id(layer): (owner, attribute, layout function)}` for each layer of
    `model` that a declaration names as a fused projection. Warns where a
    declaration of the user's names no layer with a kernel."""
    found = {}
    for owner in model._flatten_layers(include_self=True, recursive=True):
        declarations = {}
        for cls, attributes in reversed(FUSED_PROJECTIONS.classes_and_rules(owner)):
            declarations.update({a: (cls, layout) for a, layout in (attributes or {}).items()})
        for attribute, (cls, layout) in declarations.items():
            held = [h for h in _held(owner, attribute) if getattr(h, "kernel", None) is not None]
            if not held and (cls, attribute) not in FUSED_PROJECTIONS.defaults:
                warnings.warn(
                    f"register_fused_projection({cls.__name__}, {attribute!r}): "
                    f"{owner.path or owner.name} holds no layer with a kernel there, so "
                    "nothing is read as parts. Name the attribute of the `Dense`, "
                    "`EinsumDense` or convolution that holds the kernel (a dotted path "
                    "reaches into a wrapper: 'linear_start.dense').",
                    stacklevel=2,
                )
            for layer in held:
                found[id(layer)] = (owner, attribute, layout)
    return found


def _held(owner, attribute):
    """The layers `owner` holds at `attribute`: a dotted path of attributes
    and list indices, or a pattern of layer names (`"*_conv_exp"`) among
    its layers, for a functional model."""
    if "*" in attribute:
        layers = owner._flatten_layers(include_self=False, recursive=True)
        return [layer for layer in layers if fnmatch.fnmatchcase(layer.name, attribute)]
    held = owner
    for name in attribute.split("."):
        if name.isdigit() and isinstance(held, (list, tuple)):
            held = held[int(name)] if int(name) < len(held) else None
        else:
            held = getattr(held, name, None)
        if held is None:
            return []
    return [held]


def split_route(route, variable, declaration, per_head):
    """`route` (the kernel's own, one matrix) of `variable`, read as the
    parts `declaration` (`(owner, attribute, layout function)`) names.

    Raises:
        ValueError: where the declared layout does not fit the kernel.
    """
    owner, attribute, layout_of = declaration
    where = f"{type(owner).__name__}.{attribute} ({variable.path}, shape {tuple(variable.shape)})"
    if route.view is None:
        return route
    try:
        layout = layout_of(owner)
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(
            f"The layout declared for the fused projection {where} failed: {e!r}. "
            "The layer may have changed in a new version of its library."
        ) from e
    if layout is None:  # not fused in this configuration of the layer
        return route
    try:
        view, parts = _parts_view(route.view, layout, per_head)
    except ValueError as e:
        raise ValueError(
            f"The fused projection declared for {where} does not fit its kernel: {e}. "
            "Check the declaration's parts and head counts against the layer "
            "(a new version of the layer may lay its kernel out differently)."
        ) from None
    names = "|".join(p.name for p in layout.parts)
    reason = f"{route.reason}, fused [{names}]" + (" per head" if per_head else "")
    return Route(view, reason, parts)


def _parts_view(view, layout, per_head):
    """The view of the kernel that `view` reads as one matrix, as the parts
    of `layout`; and the table's `((name, (d_in, d_out), blocks), ...)`."""
    shape, inputs, outputs = _single_matrix(view)
    side, other = (outputs, inputs) if layout.side == "output" else (inputs, outputs)
    first, last = side[0], side[-1] + 1
    if list(side) != list(range(first, last)):
        raise ValueError("the fused side of the kernel is not contiguous")
    if layout.side == "input" and sum(shape[a] > 1 for a in side) > 1:
        raise ValueError(
            "the kernel reads several axes (a k×k convolution): a fusion of its input "
            "channels is not supported"
        )
    sizes, heads = _sizes(layout.parts, math.prod(shape[first:last]))
    widths = [s // h for s, h in zip(sizes, heads)]
    d_other = math.prod(shape[a] for a in other)

    def matrix(kernel_shape, split, blocks, fused):
        """`kernel_shape`'s fused side read as `split`, `blocks` and
        `fused` indexing `split`."""
        shift = len(split) - (last - first)
        others = tuple(a if a < first else a + shift for a in other)
        fused = tuple(first + a for a in fused)
        inputs, outputs = (others, fused) if layout.side == "output" else (fused, others)
        blocks = tuple(first + a for a in blocks)
        split_shape = kernel_shape[:first] + split + kernel_shape[last:]
        return MatrixView.from_axes(kernel_shape, inputs, outputs, blocks, split_shape)

    def table(d_sides, counts):
        return tuple(
            (part.name, (d_other, d) if layout.side == "output" else (d, d_other), count)
            for part, d, count in zip(layout.parts, d_sides, counts)
        )

    uniform = len(set(zip(sizes, heads))) == 1
    if layout.order != "part_major" or uniform:
        if not uniform:
            raise ValueError(f"{layout.order} parts must have one size and one head count")
        count, size, h = len(sizes), sizes[0], heads[0]
        if layout.order == "interleaved":
            if h != 1:
                raise ValueError("interleaved parts have no heads")
            split, blocks, fused = (size, count), (1,), (0,)
        elif layout.order == "head_major":
            split = (h, count, size // h)
            blocks, fused = ((1, 0), (2,)) if per_head else ((1,), (0, 2))
        else:
            split = (count, h, size // h)
            blocks, fused = ((0, 1), (2,)) if per_head else ((0,), (1, 2))
        d_side, blocks_each = (size // h, h) if per_head else (size, 1)
        result = matrix(shape, split, blocks, fused)
        return result, table([d_side] * count, [blocks_each] * count)
    if per_head and len(set(widths)) == 1:  # every head alike: one block shape
        result = matrix(shape, (sum(heads), widths[0]), (0,), (1,))
        return result, table(widths, heads)
    if last - first != 1:
        raise ValueError("parts of unequal sizes need a fused side of one axis")
    views = []
    for size, h in zip(sizes, heads):
        section = shape[:first] + (size,) + shape[last:]
        if per_head and h > 1:
            views.append(matrix(section, (h, size // h), (0,), (1,)))
        else:
            views.append(matrix(section, (size,), (), (0,)))
    d_sides = [w if per_head else s for s, w in zip(sizes, widths)]
    return PartsView.of(shape, first, views), table(d_sides, [v.num_blocks for v in views])


def _sizes(parts, length):
    """Each part's width and head count on a side of `length`."""
    if not parts:
        raise ValueError("a fused layout needs parts")
    known = sum(p.size for p in parts if p.size is not None)
    shared = [p for p in parts if p.size is None]
    rest = length - known
    if rest < 0 or (shared and rest % len(shared)) or (not shared and rest):
        declared = [p.size or "equal" for p in parts]
        raise ValueError(f"parts of sizes {declared} do not tile its fused side of {length}")
    sizes = [p.size if p.size is not None else rest // len(shared) for p in parts]
    for part, size in zip(parts, sizes):
        if part.heads < 1 or size % part.heads or size == 0:
            raise ValueError(f"part {part.name!r} of width {size} has no {part.heads} equal heads")
    return sizes, [p.heads for p in parts]


def _single_matrix(view):
    """`(shape, inputs, outputs)`: the axes of the kernel `view` reads as
    one matrix (its size-1 block axes dropped)."""
    if view.num_blocks != 1:
        raise ValueError(f"the kernel is read as {view.num_blocks} blocks, not one matrix")
    blocks, inputs, outputs = view.axes
    kept = [a for a in range(len(view.split_shape)) if a not in blocks]
    index = {a: i for i, a in enumerate(kept)}
    shape = tuple(view.split_shape[a] for a in kept)
    if shape != view.shape:
        raise ValueError("the kernel is not read in its stored axes")
    return shape, tuple(index[a] for a in inputs), tuple(index[a] for a in outputs)


def side_of(projection):
    """`(first, last, length)`: the axes `[first, last)` of `projection`'s
    kernel that its outputs lie on, and their size."""
    kernel = projection.kernel
    view = route_by_layer(projection, kernel, False).view
    if view is None:
        raise ValueError(f"{projection.path} is not routed as a matrix")
    shape, _, outputs = _single_matrix(view)
    return outputs[0], outputs[-1] + 1, math.prod(shape[outputs[0] : outputs[-1] + 1])


def part_factors(layout, length, name, head_factors):
    """Factors over an output side of `length` laid out as `layout`: each
    head of part `name` by its factor in `head_factors`, everything else
    by 1 (QK-Clip scales the query or key columns of a fused kernel)."""
    names = [p.name for p in layout.parts]
    if name not in names:
        raise ValueError(f"no part {name!r} among the parts {names}")
    if layout.side != "output" or layout.order == "interleaved":
        raise ValueError(
            f"no heads of {name!r}: its layout is {layout.order} on the {layout.side} side"
        )
    sizes, heads = _sizes(layout.parts, length)
    index = names.index(name)
    if layout.order == "head_major":
        if len(set(zip(sizes, heads))) != 1:
            raise ValueError("head-major parts must have one size and one head count")
        ones = ops.ones_like(head_factors)
        rows = [head_factors if i == index else ones for i in range(len(sizes))]
        width = sizes[0] // heads[0]
        return ops.reshape(
            ops.repeat(ops.stack(rows, axis=1)[..., None], width, axis=-1), (length,)
        )
    start = sum(sizes[:index])
    columns = ops.repeat(head_factors, sizes[index] // heads[index])
    before = ops.ones((start,), head_factors.dtype)
    after = ops.ones((length - start - sizes[index],), head_factors.dtype)
    return ops.concatenate([before, columns, after])
