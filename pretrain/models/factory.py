"""Build registered variants (MLP-Mixer and the ConvMixer baseline) by name, with constructor overrides."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from .convmixer import CONVMIXER_CFGS, ConvMixer
from .mixer import MODEL_CFGS, MlpMixer

# name -> (class, constructor arguments)
_REGISTRY: dict[str, tuple[type[nn.Module], dict]] = {
    **{name: (MlpMixer, cfg) for name, cfg in MODEL_CFGS.items()},
    **{name: (ConvMixer, cfg) for name, cfg in CONVMIXER_CFGS.items()},
}


def _overridable(cls: type[nn.Module]) -> tuple[str, ...]:
    """Constructor arguments a caller may override (num_classes has its own parameter)."""
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "num_classes"))



def list_models() -> list[str]:
    """Names of all registered variants, sorted."""
    return sorted(_REGISTRY)


def _closest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    match = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """Build variant ``name``; ``overrides`` replace any MlpMixer constructor argument.

    Raises ValueError for an unknown name and TypeError for an unknown override, each one line.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}{_closest(name, list_models())}; valid: {', '.join(list_models())}")
    cls, cfg = _REGISTRY[name]
    valid = _overridable(cls)
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        # Check before building, so a typo fails at once even for a 431M-parameter model.
        key = unknown[0]
        raise TypeError(
            f"unknown override {key!r} for model {name!r}{_closest(key, valid)}; valid: {', '.join(valid)}"
        )
    return cls(num_classes=num_classes, **{**cfg, **overrides})
