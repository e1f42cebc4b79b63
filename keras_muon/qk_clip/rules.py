"""Which attention layers QK-Clip clips, and how it reads each: one rule
per layer type, in the registry `ATTENTION_RULES`.

A rule `rule(layer) -> AttentionSpec` names the layer's query and key
projections, the scale of its logits and the method that receives the
projected query and key; or returns a string saying why the layer cannot
be clipped (it is then listed, not clipped). Rules for Keras's attention
layers are registered here, keras-hub's in `qk_clip.keras_hub`.
"""

import dataclasses
import typing

import keras

from keras_muon.registry import LayerRegistry

ATTENTION_RULES = LayerRegistry()


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How QK-Clip reads and rescales one attention layer.

    Attributes:
        query: The query projection, an `EinsumDense` whose output is
            `(batch, positions, query_heads, head_dim)`; or a
            `ProjectionPart`, the query columns of a fused projection; or
            a tuple of them, projections whose outputs the layer
            concatenates along positions (joint attention), all scaled
            alike.
        key: The key projection, output `(batch, positions, key_heads,
            head_dim)`, in the same forms; `query_heads` is a multiple of
            `key_heads`.
        scale: The factor of `q·k` in the logits (`1/sqrt(head_dim)`).
        method: The name of the layer's method that receives the projected
            query and key as its first two arguments (after rotary
            embeddings, if any) and the mask as `attention_mask`.
        mask: Optional `mask(layer, query, key, arguments) -> mask`: the
            positions allowed, `(batch, queries, keys)` boolean or None,
            from the query, key and the other arguments of `method` (a
            dict by name), for layers that restrict the mask further
            inside `method` (sliding windows). By default the
            `attention_mask` argument, and-ed with a causal mask when a
            `use_causal_mask` argument is true.
    """

    query: typing.Any
    key: typing.Any
    scale: float
    method: str = "_compute_attention"
    mask: typing.Callable | None = None


@dataclasses.dataclass(frozen=True)
class ProjectionPart:
    """A part of a fused projection (`projection`, a `Dense`,
    `EinsumDense` or convolution whose outputs are laid out as `layout`, a
    `FusedLayout`): the columns of its part `part`, one group per head, and
    of its bias. QK-Clip scales only those."""

    projection: keras.layers.Layer
    layout: typing.Any  # routing.fused.FusedLayout
    part: str

    @property
    def heads(self):
        for part in self.layout.parts:
            if part.name == self.part:
                return part.heads
        names = ", ".join(p.name for p in self.layout.parts)
        raise ValueError(f"no heads of a part {self.part!r}: the layout's parts are {names}")


def projections(role):
    """The projections of an `AttentionSpec` query or key, as a tuple."""
    return tuple(role) if isinstance(role, (tuple, list)) else (role,)


def register_attention_rule(layer_type, rule):
    """Declares how QK-Clip reads and rescales the attention of `layer_type`
    (and subclasses).

    Args:
        layer_type: A `keras.layers.Layer` subclass.
        rule: `rule(layer) -> AttentionSpec`, or a string saying why the
            layer cannot be clipped (it is then listed, not clipped).

    Example:

    ```python
    def my_attention_rule(layer):
        if layer.normalize_qk:
            return "QK-norm: scaling the kernels does not change the logits"
        return keras_muon.AttentionSpec(
            query=layer.q_proj, key=layer.k_proj, scale=layer.head_dim**-0.5,
            method="attend",  # attend(q, k, v, attention_mask=None)
        )

    keras_muon.register_attention_rule(MyAttention, my_attention_rule)
    ```
    """
    ATTENTION_RULES.register(layer_type, rule)


def einsum_projection_rule(query, key, scale, mask=None):
    """A rule for layers whose `_compute_attention(query, key, value,
    attention_mask, ...)` receives the projections `layer.<query>` and
    `layer.<key>`, with logits scaled by `scale(layer)`."""

    def rule(layer):
        if len(getattr(layer, "_attention_axes", None) or (1,)) != 1:
            return "attention over several axes is not supported"
        return AttentionSpec(
            query=getattr(layer, query), key=getattr(layer, key), scale=scale(layer), mask=mask
        )

    return rule


ATTENTION_RULES.register_defaults(
    {
        keras.layers.MultiHeadAttention: einsum_projection_rule(
            "_query_dense", "_key_dense", lambda layer: layer._inverse_sqrt_key_dim
        ),
        keras.layers.GroupQueryAttention: einsum_projection_rule(
            "_query_dense", "_key_dense", lambda layer: layer._inverse_sqrt_head_dim
        ),
    }
)
