"""Whether Triton runs kernels in its CPU interpreter; importable without Triton installed."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
