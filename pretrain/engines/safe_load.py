"""Loading engine state without executing anything a checkpoint file says.

A pickle can name any importable callable and have the loader call it, so every pickle-bearing file
of a checkpoint is read through an allow-list:

- torch.load files (ours, DeepSpeed's, the pieces inside a torch.distributed.checkpoint `.distcp`):
  `weights_only=True` (tensors, numbers, strings, containers and the classes a caller allows by
  name). `forced_weights_only` also makes third-party code that calls `torch.load(weights_only=False)`
  on our behalf (DeepSpeed's load_checkpoint internals, DCP's byte items) load weights-only.
- DCP's `.metadata`, a plain pickle of DCP's own dataclasses: `read_dcp_metadata`, an unpickler that
  resolves only those classes, torch.Size, dtypes and paths. An allow-list rather than a format of our
  own because DCP's resharding planner needs exactly this Metadata object; the list is short, and a
  torch release that adds a class makes the load refuse with one line naming it, never run it.

Checksums in metadata.json guard against corruption, not tampering: whoever can rewrite a file can
rewrite its hash. The allow-lists are what make a hostile checkpoint harmless.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import pathlib
import pickle
from typing import IO, Any, Iterator

import torch


def refusal(err: BaseException) -> str:
    """One line saying why a file was refused: torch's weights-only error is a paragraph, whose
    useful line names the global it would not load."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line or "refusing" in line]
    return (named or lines or [type(err).__name__])[0]


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Every torch.load in this block loads weights-only, whatever its caller asked for (torch reads
    TORCH_FORCE_WEIGHTS_ONLY_LOAD on each call). Loads happen before training starts, so no other
    thread is affected in practice; the previous value is restored."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def enum_member(cls: Any, name: str) -> Any:
    """Stands in for `getattr` while unpickling: newer Pythons pickle an Enum member as
    getattr(EnumClass, "name"); only that lookup is allowed, nothing else `getattr` could reach."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"refusing getattr({cls!r}, {name!r}) in a checkpoint file")


def _dcp_allowed() -> dict[tuple[str, str], Any]:
    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_md
    import torch.serialization

    allowed: dict[tuple[str, str], Any] = {}
    for name, obj in vars(dcp_md).items():  # DCP's metadata dataclasses and enums, nothing else
        if isinstance(obj, type) and obj.__module__ == dcp_md.__name__ and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            allowed[(dcp_md.__name__, name)] = obj
    allowed[(dcp_fs.__name__, "_StorageInfo")] = dcp_fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # name -> torch.layout
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls  # StorageMeta.checkpoint_id
    allowed[("builtins", "getattr")] = enum_member
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _DCPMetadataUnpickler(pickle.Unpickler):
    allowed: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of DCP metadata)")


def read_dcp_metadata(f: IO[bytes]) -> Any:
    """DCP's `.metadata` pickle, resolving only DCP's metadata classes (see the module doc)."""
    if not _DCPMetadataUnpickler.allowed:
        _DCPMetadataUnpickler.allowed = _dcp_allowed()
    return _DCPMetadataUnpickler(f).load()
