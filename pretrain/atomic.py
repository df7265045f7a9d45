"""Small files (markers, JSON, YAML) that readers see whole or not at all."""
from __future__ import annotations

import contextlib
import os
import secrets

import fsspec
from fsspec.implementations.local import LocalFileSystem


def process_umask() -> int:
    """The process umask, read without changing it (os.umask sets it too: a race with the checkpoint thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): set and put back at once
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """Give a file written by a library that creates it 0600 (safetensors' save_file) the permissions
    every other file of the run gets: 0666 less the umask, so a group's evaluation job can read it."""
    os.chmod(path, 0o666 & ~process_umask())


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace `path` with `data` in one step: locally written to a temporary name beside it (same
    file system) and renamed over it, so a crash leaves the old file or the new one, never a torn one;
    on object storage one PUT, since an object appears whole or not at all."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    path = fs._strip_protocol(path)  # file:///a/b -> /a/b
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666, not mkstemp's 0o600: the file gets the umask's permissions, as a plain write would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_url_atomic(url: str, data: bytes) -> None:
    """`write_atomic` to any fsspec URL, creating its parent directory first (exports, weight files)."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    write_atomic(fs, path, data)
