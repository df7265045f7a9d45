"""Atomic, verifiable, resumable checkpoints under `<run_dir>/checkpoints/step_XXXXXXX/`.

Layout of one checkpoint:
  model.safetensors   consolidated weights (rank 0)                  -- no pickle at all
  engine.pt           optimiser / schedule / loss-scaler state (rank 0)  -- loaded weights_only
  rank_NNNNN.pt       per-rank RNG states and data-stream position    -- loaded weights_only
  config.yaml         the resolved config of the run that wrote it
  metadata.json       step, world size, engine, sha256 of every file; written last

Publication is atomic: everything is written into `step_XXXXXXX.tmp`, the metadata last, and the
directory is renamed only when complete, so a crash mid-save leaves the previous checkpoint intact
and the half-written one is never mistaken for a good one (it has the .tmp suffix, or no metadata,
or a checksum that does not match). Storage is addressed through fsspec.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .dist import DistInfo, barrier

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, partial, or of another format)."""


class CheckpointLayoutError(CheckpointError):
    """A valid checkpoint that this run cannot take (e.g. another world size): never skipped silently."""


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_from_bytes(data: bytes) -> Any:
    # weights_only: tensors, numbers, strings and containers only -- never arbitrary pickled code.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@dataclass
class Loaded:
    step: int
    path: str
    model: dict[str, torch.Tensor]
    engine: dict[str, Any]
    rank_state: dict[str, Any]
    metadata: dict[str, Any]


class Checkpointer:
    def __init__(self, run_dir: str, dist_info: DistInfo, keep_last: int = 3) -> None:
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.root = root.rstrip("/") + "/checkpoints"
        self.dist = dist_info
        self.keep_last = keep_last

    # ---- writing ---------------------------------------------------------------------------
    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def save(self, step: int, model_state: dict[str, torch.Tensor], engine_state: dict[str, Any],
             rank_state: dict[str, Any], extra_metadata: dict[str, Any], config_yaml: str) -> str:
        """Collective: every rank calls it. Returns the published path."""
        final = f"{self.root}/step_{step:07d}"
        tmp = final + ".tmp"
        if self.dist.is_main:
            if self.fs.exists(tmp):  # left by a crash during an earlier save of this step
                self.fs.rm(tmp, recursive=True)
            self.fs.makedirs(tmp, exist_ok=True)
        barrier()
        rank_file = f"rank_{self.dist.rank:05d}.pt"
        self._write(f"{tmp}/{rank_file}", _torch_bytes(rank_state))
        if self.dist.is_main:
            blobs = {
                "model.safetensors": st_save({k: v.detach().cpu().contiguous() for k, v in model_state.items()}),
                "engine.pt": _torch_bytes(engine_state),
                "config.yaml": config_yaml.encode(),
            }
            for name, data in blobs.items():
                self._write(f"{tmp}/{name}", data)
        barrier()  # all rank files are on storage before the checksums are taken
        if self.dist.is_main:
            files = {name: _sha256(data) for name, data in blobs.items()}
            for r in range(self.dist.world_size):
                name = f"rank_{r:05d}.pt"
                files[name] = _sha256(self.fs.cat_file(f"{tmp}/{name}"))
            meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.dist.world_size,
                    "time": time.time(), "files": files, **extra_metadata}
            self._write(f"{tmp}/metadata.json", json.dumps(meta, indent=1).encode())
            if self.fs.exists(final):  # re-saving the same step (e.g. after a resume): replace it
                self.fs.rm(final, recursive=True)
            self.fs.mv(tmp, final, recursive=True)
            self._purge()
        barrier()
        return final

    def _purge(self) -> None:
        steps = self.list_steps()
        for step in steps[: -self.keep_last]:
            self.fs.rm(f"{self.root}/step_{step:07d}", recursive=True)

    # ---- reading ---------------------------------------------------------------------------
    def list_steps(self) -> list[int]:
        """Published checkpoints (not .tmp), oldest first. Validity is checked on load."""
        if not self.fs.exists(self.root):
            return []
        steps = []
        for p in self.fs.ls(self.root, detail=False):
            m = STEP_DIR.match(p.rstrip("/").rsplit("/", 1)[-1])
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def _read_verified(self, path: str, meta: dict[str, Any], name: str) -> bytes:
        expected = meta["files"].get(name)
        if expected is None:
            raise CheckpointError(f"{path}: metadata.json lists no file {name}")
        data = self.fs.cat_file(f"{path}/{name}")
        if _sha256(data) != expected:
            raise CheckpointError(f"{path}/{name}: checksum mismatch (file corrupt or partly written)")
        return data

    def load(self, step: int) -> Loaded:
        path = f"{self.root}/step_{step:07d}"
        try:
            meta = json.loads(self.fs.cat_file(f"{path}/metadata.json"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no metadata.json (incomplete checkpoint)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}/metadata.json: not valid JSON ({e})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
        if meta["world_size"] != self.dist.world_size:
            raise CheckpointLayoutError(
                f"{path}: written by {meta['world_size']} ranks, this run has {self.dist.world_size}; "
                "resuming on a different world size is not supported by this engine")
        model = st_load(self._read_verified(path, meta, "model.safetensors"))
        engine = _torch_from_bytes(self._read_verified(path, meta, "engine.pt"))
        rank_state = _torch_from_bytes(self._read_verified(path, meta, f"rank_{self.dist.rank:05d}.pt"))
        return Loaded(step=meta["step"], path=path, model=model, engine=engine, rank_state=rank_state,
                      metadata=meta)

    def load_latest(self) -> Loaded | None:
        """The newest checkpoint that verifies; a corrupt or partial one is skipped with a warning.
        Every rank reads the same directory listing, so all ranks agree on the step."""
        for step in reversed(self.list_steps()):
            try:
                return self.load(step)
            except CheckpointLayoutError:
                raise
            except CheckpointError as e:
                log.warning("skipping checkpoint: %s", e)
        return None
