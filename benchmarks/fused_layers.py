"""Tiny models holding each kind of fused projection of keras-hub 0.32.

One builder per kind of fused kernel, built offline from the layers'
constructors, in rows lettered by kind: A fused q|k|v (A1-A9), B a query
fused with its output gate, C fused GLU gate|up halves (C1-C4), E the
chunks of an adaptive norm's modulation (E1-E3), F fusions on the input
side (F1, F2), G convolution channel halves (G1, G2). (The expert banks
with fused gate|up, D, are surveyed with their models.) Each returns
`(model, kernels)`: a built model running the keras-hub layer that owns the
fused projection, and that row's fused kernel variables. A small Dense reads
the layer's outputs, so no fused kernel is an output head of the model.
"""

import keras
from keras import ops


def _input(*shape):
    """A symbolic float32 input: building on it compiles nothing."""
    return keras.KerasTensor(shape)


class Harness(keras.Model):
    """Runs `layer` on its inputs, then a Dense on the mean of each of its
    floating-point outputs."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer
        self.head = keras.layers.Dense(1)

    def build(self, input_shape):
        pass  # `layer` and `head` build on the first call

    def call(self, inputs):
        outputs = keras.tree.flatten(self.layer(*inputs))
        pooled = [
            ops.mean(t, axis=tuple(range(len(t.shape) - 1)))
            for t in outputs
            if t is not None and keras.backend.is_float_dtype(t.dtype)
        ]
        return self.head(ops.concatenate(pooled)[None])


def _run(layer, *inputs):
    """A `Harness` of `layer`, built by a call on `inputs`."""
    model = Harness(layer)
    model(list(inputs))
    return model


def build_a1():
    from keras_hub.src.models.swin_transformer.swin_transformer_layers import WindowAttention

    layer = WindowAttention(dim=16, num_heads=2, window_size=2)
    return _run(layer, _input(2, 4, 16)), [layer.qkv.kernel]


def build_a2():
    from keras_hub.src.models.vit_det.vit_layers import MultiHeadAttentionWithRelativePE

    layer = MultiHeadAttentionWithRelativePE(
        num_heads=2, key_dim=8, use_rel_pos=True, input_size=(4, 4)
    )
    return _run(layer, _input(1, 4, 4, 16)), [layer.qkv.kernel]


def build_a3():
    from keras_hub.src.models.gpt_neo_x.gpt_neo_x_attention import GPTNeoXAttention

    layer = GPTNeoXAttention(num_heads=2, hidden_dim=16, max_sequence_length=8)
    return _run(layer, _input(1, 5, 16)), [layer._qkv_dense.kernel]


def build_a4():
    from keras_hub.src.models.flux.flux_layers import DoubleStreamBlock

    block = DoubleStreamBlock(hidden_size=16, num_heads=2, mlp_ratio=2.0, use_bias=False)
    image, text, modulation = _input(1, 4, 16), _input(1, 3, 16), _input(1, 16)
    rotary = _input(1, 7, 4, 2)  # (batch, text + image length, head dim / 2, (cos, sin))
    model = _run(block, image, text, modulation, rotary)
    return model, [block.image_attn.qkv.kernel, block.text_attn.qkv.kernel]


def _flux_single_stream():
    from keras_hub.src.models.flux.flux_layers import SingleStreamBlock

    block = SingleStreamBlock(hidden_size=16, num_heads=2, mlp_ratio=2.0)
    rotary = _input(1, 5, 4, 2)  # (batch, length, head dim / 2, (cos, sin))
    return _run(block, _input(1, 5, 16), _input(1, 16), rotary), block


def build_a5():
    model, block = _flux_single_stream()
    return model, [block.linear1.kernel]


def build_a6():
    from keras_hub.src.models.stable_diffusion_3.mmdit import MMDiTBlock

    block = MMDiTBlock(
        num_heads=2,
        hidden_dim=16,
        mlp_ratio=2.0,
        use_context_projection=True,
        qk_norm=None,
        use_dual_attention=True,
    )
    model = _run(block, _input(1, 4, 16), _input(1, 3, 16), _input(1, 24))
    return model, [block.x_block.attention_qkv.kernel, block.x_block.attention_qkv2.kernel]


def build_a7():
    from keras_hub.src.models.qwen3_5.qwen3_5_vision_encoder import Qwen3_5VisionAttention

    layer = Qwen3_5VisionAttention(hidden_size=16, num_heads=2)
    rotary = (_input(6, 8), _input(6, 8))  # cos, sin
    return _run(layer, _input(6, 16), rotary), [layer.qkv.kernel]


def build_a8():
    from keras_hub.src.models.qwen3_5.qwen3_5_gated_delta_net import Qwen3_5GatedDeltaNet

    layer = Qwen3_5GatedDeltaNet(
        hidden_size=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
    )
    return _run(layer, _input(1, 5, 16)), [layer.in_proj_qkv.kernel]


def build_a9():
    from keras_hub.src.models.mobilenetv5.mobilenetv5_attention import Attention2d

    layer = Attention2d(filters=16, num_heads=2, channel_axis=-1, data_format="channels_last")
    return _run(layer, _input(1, 4, 4, 16)), [layer.qkv.kernel]


def build_b1():
    from keras_hub.src.models.qwen3_5.qwen3_5_attention import Qwen3_5Attention

    layer = Qwen3_5Attention(num_query_heads=2, num_key_value_heads=1, head_dim=8)
    return _run(layer, _input(1, 5, 16)), [layer._query_dense.kernel]


def build_c1():
    from keras_hub.src.models.dinov2.dinov2_layers import DINOV2SwiGLUFFN

    layer = DINOV2SwiGLUFFN(hidden_dim=16, intermediate_dim=48)
    return _run(layer, _input(1, 5, 16)), [layer.weights_in.kernel]


def build_c2():
    from keras_hub.src.models.moonshine.moonshine_layers import MoonshineMLP

    layer = MoonshineMLP(hidden_dim=16, feedforward_expansion_factor=2, use_swiglu_activation=True)
    return _run(layer, _input(1, 5, 16)), [layer.dense_1.kernel]


def build_c3():
    from keras_hub.src.models.gemma4.gemma4_audio_encoder import Gemma4AudioConformerLightConv1d

    layer = Gemma4AudioConformerLightConv1d(hidden_size=16, kernel_size=3)
    return _run(layer, _input(1, 6, 16)), [layer.linear_start.dense.kernel]


def build_c4():
    from keras_hub.src.models.gemma3n.gemma3n_audio_layers import Gemma3nAudioConformerLightConv1d

    layer = Gemma3nAudioConformerLightConv1d(
        hidden_size=16, rms_norm_eps=1e-6, conv_kernel_size=3, gradient_clipping=1e10
    )
    return _run(layer, _input(1, 6, 16)), [layer.linear_start.kernel]


def build_e1():
    from keras_hub.src.models.stable_diffusion_3.mmdit import AdaptiveLayerNormalization

    layer = AdaptiveLayerNormalization(hidden_dim=16, num_modulations=6)
    return _run(layer, _input(1, 4, 16), _input(1, 24)), [layer.dense.kernel]


def build_e2():
    from keras_hub.src.models.flux.flux_layers import Modulation

    layer = Modulation(dim=16, double=True)
    return _run(layer, _input(1, 24)), [layer.linear_projection.kernel]


def build_e3():
    from keras_hub.src.models.flux.flux_layers import LastLayer

    layer = LastLayer(hidden_size=16, patch_size=1, output_channels=4)
    model = _run(layer, _input(1, 5, 16), _input(1, 24))
    return model, [layer.adaLN_modulation.layers[1].kernel]


def build_f1():
    model, block = _flux_single_stream()
    return model, [block.linear2.kernel]


def build_f2():
    from keras_hub.src.models.d_fine.d_fine_layers import DFineGate

    layer = DFineGate(hidden_dim=16)
    return _run(layer, _input(1, 5, 16), _input(1, 5, 16)), [layer.gate.kernel]


def build_g1():
    from keras_hub.src.models.cspnet.cspnet_backbone import CSPNetBackbone

    backbone = CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=1,
        stackwise_depth=[1],
        stackwise_strides=[1],
        stackwise_num_filters=[16],
        block_type="bottleneck_block",
        stage_type="csp",
        expand_ratio=[2.0],
        image_shape=(8, 8, 3),
    )
    kernels = [layer.kernel for layer in backbone.layers if layer.name.endswith("_csp_conv_exp")]
    return _run(backbone, _input(1, 8, 8, 3)), kernels


def build_g2():
    from keras_hub.src.models.vae.vae_layers import VAEEncoder

    # Filters a multiple of 32: the encoder's GroupNormalization has 32 groups.
    layer = VAEEncoder(stackwise_num_filters=[32], stackwise_num_blocks=[1], output_channels=8)
    return _run(layer, _input(1, 8, 8, 3)), [layer.output_projection.kernel]


# Row: (model family, layer class and attribute; builder).
ROWS = {
    "A1": ("Swin WindowAttention.qkv", build_a1),
    "A2": ("ViTDet/SAM MultiHeadAttentionWithRelativePE.qkv", build_a2),
    "A3": ("GPT-NeoX GPTNeoXAttention._qkv_dense", build_a3),
    "A4": ("Flux SelfAttention.qkv (double stream)", build_a4),
    "A5": ("Flux SingleStreamBlock.linear1", build_a5),
    "A6": ("SD3 DismantledBlock.attention_qkv, attention_qkv2", build_a6),
    "A7": ("Qwen3.5 Qwen3_5VisionAttention.qkv", build_a7),
    "A8": ("Qwen3.5 Qwen3_5GatedDeltaNet.in_proj_qkv", build_a8),
    "A9": ("MobileNetV5 Attention2d.qkv", build_a9),
    "B1": ("Qwen3.5 Qwen3_5Attention._query_dense", build_b1),
    "C1": ("DINOv2 DINOV2SwiGLUFFN.weights_in", build_c1),
    "C2": ("Moonshine MoonshineMLP.dense_1", build_c2),
    "C3": ("Gemma4 Gemma4AudioConformerLightConv1d.linear_start", build_c3),
    "C4": ("Gemma3n Gemma3nAudioConformerLightConv1d.linear_start", build_c4),
    "E1": ("SD3 AdaptiveLayerNormalization.dense", build_e1),
    "E2": ("Flux Modulation.linear_projection", build_e2),
    "E3": ("Flux LastLayer.adaLN_modulation", build_e3),
    "F1": ("Flux SingleStreamBlock.linear2", build_f1),
    "F2": ("D-FINE DFineGate.gate", build_f2),
    "G1": ("CSPNet CSPNetBackbone stage_0_csp_conv_exp", build_g1),
    "G2": ("VAE VAEEncoder.output_projection", build_g2),
}
