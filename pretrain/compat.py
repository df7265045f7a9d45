"""Guards against broken optional packages in the environment.

A torchvision built for another torch (the registry's wheel next to a CPU torch: `pip install timm`
pulls it in) fails on import with `RuntimeError: operator torchvision::nms does not exist`. torchmetrics
imports torchvision whenever it is installed, so without this guard every training run would die at
import over a package it does not need. The guard hides such a torchvision, for this process only.
"""
from __future__ import annotations

import importlib.util
import sys

# Why torchvision was hidden ("RuntimeError: ..."), or None while it imports (or is absent).
HIDDEN_TORCHVISION: str | None = None


def hide_broken_torchvision() -> str | None:
    """Import torchvision once; if it is installed but fails to import, make it look absent: `import
    torchvision` raises ImportError and torchmetrics' availability check (lightning_utilities'
    RequirementCache, which reads the package metadata) says no. Returns why it was hidden, or None."""
    global HIDDEN_TORCHVISION
    if HIDDEN_TORCHVISION is not None or sys.modules.get("torchvision", False) is None:
        return HIDDEN_TORCHVISION
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return None  # imported fine already, or not installed
    try:
        import torchvision  # noqa: F401
        return None
    except Exception as e:  # noqa: BLE001 -- a broken build raises anything: RuntimeError, OSError, ...
        HIDDEN_TORCHVISION = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]  # half-imported submodules
    sys.modules["torchvision"] = None  # type: ignore[assignment] -- import raises ImportError, find_spec gives None
    try:
        from importlib.metadata import PackageNotFoundError

        from lightning_utilities.core import imports as lu_imports
    except ImportError:
        return HIDDEN_TORCHVISION
    version = lu_imports._version

    def _version(name: str) -> str:  # the installed metadata would still say "torchvision is available"
        if name == "torchvision":
            raise PackageNotFoundError(name)
        return version(name)

    lu_imports._version = _version
    return HIDDEN_TORCHVISION
