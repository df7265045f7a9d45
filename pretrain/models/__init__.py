"""MLP-Mixer models with timm-compatible parameter names."""

from .factory import create_model, list_models
from .mixer import DropPath, activation_name, MixerBlock, Mlp, MlpMixer, TokenMixingMlp
from .mlp_impl import MLP_IMPLS, apply_mlp_impl

__all__ = ["create_model", "list_models", "MlpMixer", "MixerBlock", "Mlp", "TokenMixingMlp", "DropPath",
           "apply_mlp_impl", "MLP_IMPLS", "activation_name"]
