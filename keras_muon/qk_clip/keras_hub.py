"""Where keras-hub's attention layers keep their query and key projections.

QK-Clip's rules for keras-hub models, declared by `register_if_imported()`
when keras-hub has been imported; keras_muon does not depend on keras-hub.
GPT-2 and the other models built on `CachedMultiHeadAttention` use the
`MultiHeadAttention` rule.
"""

import sys

import numpy as np

from keras_muon.qk_clip.rules import ATTENTION_RULES
from keras_muon.qk_clip.rules import AttentionSpec
from keras_muon.qk_clip.rules import ProjectionPart
from keras_muon.qk_clip.rules import einsum_projection_rule
from keras_muon.registry import installed_classes
from keras_muon.routing.keras_hub import GPT_NEO_X_QKV
from keras_muon.routing.keras_hub import SD3_QKV


def _gemma_scale(layer):
    if layer.query_head_dim_normalize:
        return 1 / np.sqrt(layer.head_dim)
    return 1 / np.sqrt(layer.hidden_dim // layer.num_query_heads)


def _gemma_mask(layer, query, key, arguments):
    """Gemma narrows the mask to its sliding window inside the method."""
    mask = arguments["attention_mask"]
    if layer.use_sliding_window_attention and mask is not None:
        mask = layer._mask_sliding_window(mask, cache_update_index=arguments["cache_update_index"])
    return mask


def _gemma_rule(layer):
    if getattr(layer, "use_query_key_norm", False):
        return _QK_NORM
    return einsum_projection_rule("query_dense", "key_dense", _gemma_scale, _gemma_mask)(layer)


_QK_NORM = "QK-norm: scaling the query and key kernels does not change the logits"


def _gpt_neo_x_rule(layer):
    """q, k and v of each head side by side in one kernel `(d, heads,
    3·head_dim)`: the clip scales each head's q and k columns."""
    layout = GPT_NEO_X_QKV(layer)
    return AttentionSpec(
        query=ProjectionPart(layer._qkv_dense, layout, "q"),
        key=ProjectionPart(layer._qkv_dense, layout, "k"),
        scale=layer._inv_norm_factor,
    )


def _mmdit_rule(layer):
    """Joint attention: the context's and the image's q (and k), each from
    its stream's fused `[q | k | v]` kernel, concatenated along positions."""
    if layer.qk_norm is not None:
        return _QK_NORM
    if layer.x_block.use_dual_attention:
        return "dual attention: one method computes both attentions, whose logits differ"
    blocks = (layer.context_block, layer.x_block)
    return AttentionSpec(
        query=tuple(ProjectionPart(b.attention_qkv, SD3_QKV(b), "q") for b in blocks),
        key=tuple(ProjectionPart(b.attention_qkv, SD3_QKV(b), "k") for b in blocks),
        scale=layer._inverse_sqrt_key_dim,
    )


def _listed(reason):
    return lambda layer: reason


_INLINE = "the logits are computed inside `call`: no method receives the query and key"
_RELATIVE = (
    _INLINE + "; a relative-position term is added to them, which scaling the "
    "query and key kernels cannot bound"
)
_LLAMA_LIKE = einsum_projection_rule(
    "_query_dense", "_key_dense", lambda layer: layer._inv_norm_factor
)
_LLAMA_LIKE_PUBLIC = einsum_projection_rule(
    "query_dense", "key_dense", lambda layer: layer._inv_norm_factor
)
# (module, class): rule, as in keras-hub 0.32.
KERAS_HUB_RULES = {
    ("keras_hub.src.models.llama.llama_attention", "LlamaAttention"): _LLAMA_LIKE,
    ("keras_hub.src.models.mistral.mistral_attention", "CachedMistralAttention"): _LLAMA_LIKE,
    ("keras_hub.src.models.qwen.qwen_attention", "QwenAttention"): _LLAMA_LIKE,
    ("keras_hub.src.models.mixtral.mixtral_attention", "CachedMixtralAttention"): (
        _LLAMA_LIKE_PUBLIC
    ),
    ("keras_hub.src.models.qwen_moe.qwen_moe_attention", "QwenMoeAttention"): (_LLAMA_LIKE_PUBLIC),
    ("keras_hub.src.models.qwen3.qwen3_attention", "Qwen3Attention"): lambda layer: _QK_NORM,
    ("keras_hub.src.models.qwen3_moe.qwen3_moe_attention", "Qwen3MoeAttention"): (
        lambda layer: _QK_NORM
    ),
    ("keras_hub.src.models.gemma.gemma_attention", "CachedGemmaAttention"): _gemma_rule,
    ("keras_hub.src.models.gemma3.gemma3_attention", "CachedGemma3Attention"): _gemma_rule,
    ("keras_hub.src.models.gpt_neo_x.gpt_neo_x_attention", "GPTNeoXAttention"): _gpt_neo_x_rule,
    ("keras_hub.src.models.stable_diffusion_3.mmdit", "MMDiTBlock"): _mmdit_rule,
    # Listed with the reason they are not clipped.
    ("keras_hub.src.models.swin_transformer.swin_transformer_layers", "WindowAttention"): (
        _listed(_RELATIVE)
    ),
    ("keras_hub.src.models.vit_det.vit_layers", "MultiHeadAttentionWithRelativePE"): (
        _listed(_RELATIVE)
    ),
    ("keras_hub.src.models.qwen3_5.qwen3_5_vision_encoder", "Qwen3_5VisionAttention"): (
        _listed(_INLINE)
    ),
    ("keras_hub.src.models.mobilenetv5.mobilenetv5_attention", "Attention2d"): _listed(_INLINE),
    ("keras_hub.src.models.mobilenetv5.mobilenetv5_attention", "MultiQueryAttention2d"): (
        _listed(_INLINE)
    ),
    ("keras_hub.src.models.flux.flux_layers", "DoubleStreamBlock"): _listed(_QK_NORM),
    ("keras_hub.src.models.flux.flux_layers", "SingleStreamBlock"): _listed(_QK_NORM),
    ("keras_hub.src.models.qwen3_5.qwen3_5_attention", "Qwen3_5Attention"): _listed(_QK_NORM),
    ("keras_hub.src.models.gemma4.gemma4_attention", "Gemma4TextAttention"): _listed(_QK_NORM),
    ("keras_hub.src.models.qwen3_5.qwen3_5_gated_delta_net", "Qwen3_5GatedDeltaNet"): _listed(
        "linear attention: no softmax logits to bound"
    ),
}


def register_if_imported():
    """Declares the rules of the keras-hub attention layers that this
    keras-hub has, if keras-hub has been imported. A rule the user
    registered is kept."""
    if "keras_hub" in sys.modules:
        ATTENTION_RULES.register_defaults(installed_classes(KERAS_HUB_RULES))
