"""Muon for Keras 3: layer-aware, on TensorFlow, JAX and PyTorch."""

from keras_muon.adamuon import AdaMuon
from keras_muon.monitor.callback import MuonMonitor
from keras_muon.monitor.callback import QKClipMonitor
from keras_muon.muon import Muon
from keras_muon.normuon import NorMuon
from keras_muon.qk_clip.rules import AttentionSpec
from keras_muon.qk_clip.rules import ProjectionPart
from keras_muon.qk_clip.rules import register_attention_rule
from keras_muon.routing.fused import FusedLayout
from keras_muon.routing.fused import Part
from keras_muon.routing.fused import register_fused_projection
from keras_muon.routing.keras_layers import register_layer_rule
from keras_muon.routing.views import MatrixView
from keras_muon.routing.views import Route
from keras_muon.update.newton_schulz import coefficient_schedule
from keras_muon.update.newton_schulz import msign
from keras_muon.update.rule import update_scale

__version__ = "0.2.0"

__all__ = [
    "AdaMuon",
    "AttentionSpec",
    "FusedLayout",
    "MatrixView",
    "Muon",
    "MuonMonitor",
    "NorMuon",
    "Part",
    "ProjectionPart",
    "QKClipMonitor",
    "Route",
    "coefficient_schedule",
    "msign",
    "register_attention_rule",
    "register_fused_projection",
    "register_layer_rule",
    "update_scale",
]
