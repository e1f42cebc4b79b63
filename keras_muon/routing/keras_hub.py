"""Routing rules for keras-hub layers that hold weight matrices directly.

Most keras-hub layers compute with Keras's own `Dense` and `EinsumDense`,
which need nothing new. The layers below create their matrices with
`add_weight` instead: mixture-of-experts banks (one `(d_in, d_out)` matrix
per expert, some with the gate and up projections fused on the output
axis) and a few others. `register_if_imported()` declares them when
keras-hub has been imported; keras_muon does not depend on keras-hub.
"""

import sys

from keras_muon.registry import installed_classes
from keras_muon.routing.keras_layers import MATRIX_RULES
from keras_muon.routing.keras_layers import not_a_matrix
from keras_muon.routing.views import MatrixView
from keras_muon.routing.views import Route


def experts_view(shape):
    """`(experts, d_in, d_out)`: one matrix per expert."""
    return MatrixView.from_axes(shape, inputs=(1,), outputs=(2,), blocks=(0,))


def fused_halves_view(shape):
    """`(experts, d_in, 2·f)` holding `[gate | up]`: two matrices per
    expert, the first and second half of the output axis."""
    experts, d_in, outputs = shape
    return MatrixView.from_axes(
        shape,
        inputs=(1,),
        outputs=(3,),
        blocks=(0, 2),
        split_shape=(experts, d_in, 2, outputs // 2),
    )


def interleaved_view(shape):
    """`(experts, d_in, 2·f)` holding gate and up interleaved (columns
    `[::2]` and `[1::2]`): two matrices per expert."""
    experts, d_in, outputs = shape
    return MatrixView.from_axes(
        shape,
        inputs=(1,),
        outputs=(2,),
        blocks=(0, 3),
        split_shape=(experts, d_in, outputs // 2, 2),
    )


_DESCRIPTIONS = {
    MatrixView.dense: "",
    experts_view: ", per expert",
    fused_halves_view: ", gate and up halves, per expert",
    interleaved_view: ", gate and up interleaved, per expert",
}

_EXPERTS = {
    "expert_feedforward_gate_dense": experts_view,
    "expert_feedforward_intermediate_dense": experts_view,
    "expert_feedforward_output_dense": experts_view,
}
_FUSED_EXPERTS = {
    "expert_feedforward_gate_dense": fused_halves_view,
    "expert_feedforward_output_dense": experts_view,
}
# (module, class): {variable name: its view, or why it goes to AdamW}, as
# in keras-hub 0.32. Other variables (biases, gains) go to AdamW.
LAYER_MATRICES = {
    ("keras_hub.src.models.mixtral.mixtral_decoder", "MixtralMoeExperts"): _EXPERTS,
    ("keras_hub.src.models.qwen_moe.qwen_moe_decoder", "QwenMoeExperts"): _FUSED_EXPERTS,
    ("keras_hub.src.models.qwen3_moe.qwen3_moe_decoder", "Qwen3MoeExperts"): _FUSED_EXPERTS,
    ("keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder", "Qwen3_5MoeExperts"): _FUSED_EXPERTS,
    ("keras_hub.src.models.gpt_oss.gpt_oss_decoder", "GptOssExperts"): {
        "gate_up_proj": interleaved_view,
        "down_proj": experts_view,
    },
    ("keras_hub.src.models.gemma4.gemma4_moe", "Gemma4MoEBlock"): {
        "gate_proj": experts_view,
        "up_proj": experts_view,
        "down_proj": experts_view,
    },
    # A projection of sinusoidal position features to the heads, inside a
    # class named like an embedding.
    ("keras_hub.src.models.gemma4.gemma4_audio_encoder", "Gemma4AudioRelativePositionEmbedding"): {
        "pos_proj": MatrixView.dense,
    },
    # Low-rank pairs `tanh(x·w1)·w2`: the projections' only weights.
    ("keras_hub.src.models.rwkv7.rwkv7_layer", "RWKV7TimeMix"): {
        name: MatrixView.dense for name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
    },
    # One filter per channel (`ops.depthwise_conv`): no matrix.
    ("keras_hub.src.models.qwen3_5.qwen3_5_gated_delta_net", "Qwen3_5GatedDeltaNet"): {
        "conv1d_kernel": "depthwise conv kernel",
    },
}


def layer_matrices_rule(entries):
    """A rule routing each variable named in `entries` to Muon with the
    view it maps to, or to AdamW with the reason it maps to; others
    (biases, gains) to AdamW."""

    def rule(layer, variable, per_head):
        entry = entries.get(variable.name)
        name = type(layer).__name__
        if isinstance(entry, str):
            return Route(None, f"{name} {entry}")
        try:
            view = entry(variable.shape) if entry else None
        except ValueError:  # not the rank this keras-hub version had
            view = None
        if view is None:
            return not_a_matrix(layer, variable)
        return Route(view, f"{name} {variable.name}{_DESCRIPTIONS[entry]}")

    return rule


def register_if_imported():
    """Declares the rules of the keras-hub layers that this keras-hub has,
    if keras-hub has been imported. A rule the user registered for one of
    these types is kept."""
    if "keras_hub" in sys.modules:
        MATRIX_RULES.register_defaults(
            {
                layer_type: layer_matrices_rule(entries)
                for layer_type, entries in installed_classes(LAYER_MATRICES).items()
            }
        )
