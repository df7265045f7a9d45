"""MLP-Mixer models with timm-compatible parameter names."""

from .factory import create_model, list_models
from .mixer import DropPath, MixerBlock, Mlp, MlpMixer

__all__ = ["create_model", "list_models", "MlpMixer", "MixerBlock", "Mlp", "DropPath"]
