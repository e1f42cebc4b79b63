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
from keras_muon.routing.fused import FUSED_PROJECTIONS
from keras_muon.routing.fused import FusedLayout
from keras_muon.routing.fused import Part
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


def _qkv(heads, order="part_major"):
    return lambda layer: FusedLayout.equal("qkv", heads=getattr(layer, heads), order=order)


# Shared with QK-Clip's rules, which scale the q and k columns of these.
GPT_NEO_X_QKV = _qkv("num_heads", "head_major")  # each head's [q_h | k_h | v_h]
SD3_QKV = _qkv("num_heads")


def _halves(first, second):
    return lambda layer: FusedLayout.equal((first, second))


def _flux_single(side):
    """Flux's single-stream block: `linear1` writes `[q | k | v | mlp_in]`,
    `linear2` reads `[attention ; mlp]`."""

    def layout(layer):
        heads, width, mlp = layer.num_heads, layer.hidden_size, layer.mlp_hidden_dim
        if side == "output":
            parts = (*(Part(n, width, heads) for n in "qkv"), Part("mlp_in", mlp))
        else:
            parts = (Part("attention", width, heads), Part("mlp_out", mlp))
        return FusedLayout(parts, side=side)

    return layout


def _gated_delta_net(layer):
    """`[q | k | v]`, v with its own head count."""
    key, value = layer.num_k_heads * layer.head_k_dim, layer.num_v_heads * layer.head_v_dim
    q, k = (Part(n, key, layer.num_k_heads) for n in "qk")
    return FusedLayout((q, k, Part("v", value, layer.num_v_heads)))


_MODULATIONS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")


def _sd3_modulation(layer):
    names = {
        2: _MODULATIONS[:2],
        6: _MODULATIONS,
        9: _MODULATIONS + ("shift_msa2", "scale_msa2", "gate_msa2"),
    }
    return FusedLayout.equal(names[layer.num_modulations])


def _flux_modulation(layer):
    names = ("shift", "scale", "gate")
    return FusedLayout.equal(
        names if layer.multiplier == 3 else tuple(f"{n}{i}" for i in (1, 2) for n in names)
    )


def _moonshine_mlp(layer):
    return FusedLayout.equal(("up", "gate")) if layer.use_swiglu_activation else None


_HUB = "keras_hub.src.models."
# (module, class): {attribute holding the fused layer: its layout}, as in
# keras-hub 0.32 (docs/routing.md lists them).
FUSED = {
    (_HUB + "swin_transformer.swin_transformer_layers", "WindowAttention"): {
        "qkv": _qkv("num_heads")
    },
    (_HUB + "vit_det.vit_layers", "MultiHeadAttentionWithRelativePE"): {"qkv": _qkv("num_heads")},
    (_HUB + "gpt_neo_x.gpt_neo_x_attention", "GPTNeoXAttention"): {"_qkv_dense": GPT_NEO_X_QKV},
    (_HUB + "flux.flux_layers", "SelfAttention"): {"qkv": _qkv("num_heads")},
    (_HUB + "flux.flux_layers", "SingleStreamBlock"): {
        "linear1": _flux_single("output"),
        "linear2": _flux_single("input"),
    },
    (_HUB + "flux.flux_layers", "Modulation"): {"linear_projection": _flux_modulation},
    (_HUB + "flux.flux_layers", "LastLayer"): {
        "adaLN_modulation.layers.1": _halves("shift", "scale")
    },
    (_HUB + "stable_diffusion_3.mmdit", "DismantledBlock"): {
        "attention_qkv": SD3_QKV,
        "attention_qkv2": SD3_QKV,
    },
    (_HUB + "stable_diffusion_3.mmdit", "AdaptiveLayerNormalization"): {"dense": _sd3_modulation},
    (_HUB + "qwen3_5.qwen3_5_vision_encoder", "Qwen3_5VisionAttention"): {"qkv": _qkv("num_heads")},
    (_HUB + "qwen3_5.qwen3_5_gated_delta_net", "Qwen3_5GatedDeltaNet"): {
        "in_proj_qkv": _gated_delta_net
    },
    (_HUB + "qwen3_5.qwen3_5_attention", "Qwen3_5Attention"): {
        "_query_dense": lambda layer: FusedLayout.equal(
            ("q", "gate"), heads=layer.num_query_heads, order="head_major"
        )
    },
    (_HUB + "mobilenetv5.mobilenetv5_attention", "Attention2d"): {"qkv": _qkv("num_heads")},
    (_HUB + "dinov2.dinov2_layers", "DINOV2SwiGLUFFN"): {"weights_in": _halves("gate", "up")},
    (_HUB + "moonshine.moonshine_layers", "MoonshineMLP"): {"dense_1": _moonshine_mlp},
    (_HUB + "gemma4.gemma4_audio_encoder", "Gemma4AudioConformerLightConv1d"): {
        "linear_start.dense": _halves("value", "gate")
    },
    (_HUB + "gemma3n.gemma3n_audio_layers", "Gemma3nAudioConformerLightConv1d"): {
        "linear_start": _halves("value", "gate")
    },
    (_HUB + "d_fine.d_fine_layers", "DFineGate"): {"gate": _halves("gate_1", "gate_2")},
    # Functional: the expanding 1×1 convolutions of each stage, by name.
    (_HUB + "cspnet.cspnet_backbone", "CSPNetBackbone"): {
        "*_csp_conv_exp": _halves("shortcut", "blocks"),
        "*_cs3_conv_exp": _halves("shortcut", "blocks"),
    },
    (_HUB + "vae.vae_layers", "VAEEncoder"): {"output_projection": _halves("mean", "log_variance")},
}


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
        FUSED_PROJECTIONS.register_defaults(installed_classes(FUSED))
