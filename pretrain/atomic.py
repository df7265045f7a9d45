"""Small files (markers, JSON, YAML) that readers see whole or not at all."""
from __future__ import annotations

import contextlib
import os
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace `path` with `data` in one step: locally written to a temporary name beside it (same
    file system) and renamed over it, so a crash leaves the old file or the new one, never a torn one;
    on object storage one PUT, since an object appears whole or not at all."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
