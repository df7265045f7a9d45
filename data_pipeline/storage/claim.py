"""One writer per output: an exclusive claim on a manifest being indexed or a shard set being written.

``claim(url, storage, doing)`` creates ``<url>.lock`` (owner: host, pid, start time, command) atomically,
or raises :class:`OutputBusy` naming the live owner; the claim is dropped when the block ends. Two
indexers or writers started on the same ``--out`` would otherwise interleave their temporary files and
one would fail half-way (or publish over the other). The atomic create is the run-dir lease's
(``create_exclusive``, shared with pretrain/run_lease.py), without its heartbeat: an output job is one
process on one host.

- local and network file systems: written to a temporary name and hard-linked to the lock name (fails
  if it exists; a reader never sees half an owner);
- S3: a PUT with ``If-None-Match: *`` (412 when a lock exists);
- other stores: check, then write.

A claim left by a process that was killed is taken over, with a warning, when it names a process of this
host that no longer exists; one of another host is refused with the command to remove it by hand.
With the claim held, :func:`remove_leftovers` deletes the temporary files a killed run left behind.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from data_pipeline.errors import DataSpecError
from data_pipeline.storage.handle import Storage

log = logging.getLogger(__name__)


class OutputBusy(DataSpecError):
    """Another live process is writing the same output; the message names it."""


def precondition_failed(e: BaseException | None) -> bool:
    """A 412 or an existing file: the create-only condition did not hold (s3fs raises it as several types)."""
    for _ in range(5):
        if e is None:
            return False
        response = getattr(e, "response", None)
        if isinstance(e, FileExistsError) or "PreconditionFailed" in str(e) or (
                isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")):
            return True
        e = e.__cause__ or e.__context__
    return False


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists (False then), atomically where the store allows:
    a hard link from a temporary file locally (readers never see it half-written), a PUT with
    If-None-Match on S3, check-then-write elsewhere. The run-dir lease takes its lease with it too."""
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if "s3" in fs.protocol or "s3a" in fs.protocol:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except Exception as e:  # noqa: BLE001 -- s3fs maps the 412 to several types
            if precondition_failed(e):
                return False
            raise
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def _read(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    try:
        owner = json.loads(fs.cat_file(path))
        return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # unreadable: an owner we cannot name, never taken over


def _gone(owner: dict) -> bool:
    """The owner is a process of this host that no longer exists."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner["started"])) \
        if isinstance(owner.get("started"), (int, float)) else "?"
    return (f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {started} "
            f"({str(owner.get('command', ''))[:120]})")


@contextlib.contextmanager
def claim(url: str, storage: Storage, doing: str) -> Iterator[None]:
    """Hold ``<url>.lock`` for the block: ``url`` is the output (a manifest, a shard set's manifest) and
    ``doing`` what this process does to it ("indexed into", "written"), for the refusal's words."""
    lock = f"{url}.lock"
    fs, path = storage.fs(lock, own_retries=True)
    fs.makedirs(path.rsplit("/", 1)[0] if "/" in path else ".", exist_ok=True)
    token = secrets.token_hex(8)
    me = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
          "command": " ".join([os.path.basename(sys.orig_argv[0]), *sys.orig_argv[1:]])}  # python -m ... as typed
    for _ in range(5):  # each pass loses only to a rival that changed the lock meanwhile
        if create_exclusive(fs, path, json.dumps(me).encode()):
            break
        owner = _read(fs, path)
        if owner is None:
            continue  # released meanwhile
        if not _gone(owner):
            raise OutputBusy(f"{url} is being {doing} by another process: {_describe(owner)}; wait for it to "
                             f"finish, or, if that process is gone, delete {lock}")
        log.warning("%s: taking over the claim of %s: that process is gone", url, _describe(owner))
        with contextlib.suppress(FileNotFoundError):
            if isinstance(fs, LocalFileSystem):  # only one contender's rename of it succeeds
                aside = f"{path}.{secrets.token_hex(4)}.stale"
                os.rename(path, aside)
                os.unlink(aside)
            else:
                fs.rm_file(path)
    else:
        raise OutputBusy(f"{url}: could not claim it (another process keeps changing {lock})")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # never hide the error that ended the block
            owner = _read(fs, path)
            if owner is not None and owner.get("token") == token:
                fs.rm_file(path)


def remove_leftovers(fs: fsspec.AbstractFileSystem, pattern: str) -> list[str]:
    """Delete the files matching the glob ``pattern`` (temporary names of a killed run; call it only while
    holding the output's claim, so no live writer owns them); return what was removed."""
    found = [p for p in fs.glob(pattern) if ".tmp-" in p.rsplit("/", 1)[-1]]
    for p in found:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(p, recursive=True)
    if found:
        log.warning("removed %d temporary file(s) left by an earlier run that was stopped: %s", len(found),
                    ", ".join(p.rsplit("/", 1)[-1] for p in found[:3]) + (" ..." if len(found) > 3 else ""))
    return found
