"""Build registered Mixer variants by name, with constructor overrides."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from .mixer import MODEL_CFGS, MlpMixer

# Constructor arguments a caller may override (num_classes has its own parameter).
_OVERRIDABLE = tuple(p for p in inspect.signature(MlpMixer.__init__).parameters if p not in ("self", "num_classes"))


def list_models() -> list[str]:
    """Names of all registered variants, sorted."""
    return sorted(MODEL_CFGS)


def _closest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    match = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> MlpMixer:
    """Build variant ``name``; ``overrides`` replace any MlpMixer constructor argument.

    Raises ValueError for an unknown name and TypeError for an unknown override, each one line.
    """
    if name not in MODEL_CFGS:
        raise ValueError(f"unknown model {name!r}{_closest(name, list_models())}; valid: {', '.join(list_models())}")
    unknown = [k for k in overrides if k not in _OVERRIDABLE]
    if unknown:
        # Check before building, so a typo fails at once even for a 431M-parameter model.
        key = unknown[0]
        raise TypeError(
            f"unknown override {key!r} for model {name!r}{_closest(key, _OVERRIDABLE)}; "
            f"valid: {', '.join(_OVERRIDABLE)}"
        )
    return MlpMixer(num_classes=num_classes, **{**MODEL_CFGS[name], **overrides})
