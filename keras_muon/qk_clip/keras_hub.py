"""Where keras-hub's attention layers keep their query and key projections.

QK-Clip's rules for keras-hub models, declared by `register_if_imported()`
when keras-hub has been imported; keras_muon does not depend on keras-hub.
GPT-2 and the other models built on `CachedMultiHeadAttention` use the
`MultiHeadAttention` rule.
"""

import sys

import numpy as np

from keras_muon.qk_clip.rules import ATTENTION_RULES
from keras_muon.qk_clip.rules import einsum_projection_rule
from keras_muon.registry import installed_classes


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
}


def register_if_imported():
    """Declares the rules of the keras-hub attention layers that this
    keras-hub has, if keras-hub has been imported. A rule the user
    registered is kept."""
    if "keras_hub" in sys.modules:
        ATTENTION_RULES.register_defaults(installed_classes(KERAS_HUB_RULES))
