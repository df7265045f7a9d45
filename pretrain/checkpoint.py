"""Atomic, verifiable, resumable checkpoints, one layout for every engine.

  <run_dir>/checkpoints/step_XXXXXXX/
    model.safetensors  consolidated fp32 weights, gathered on rank 0 (export / eval read this)
    engine/            the engine's own state: engine.pt (single, ddp), a torch.distributed.checkpoint
                       dir (fsdp), DeepSpeed's save_checkpoint dir (deepspeed)
    shared.pt          world-size independent state from rank 0: lr schedule, data-stream record, step
    rank_NNNNN.pt      per-rank RNG states
    config.yaml        the resolved config of the run that wrote it
    metadata.json      engine layout, world size, step, code version, sha256 of every file; written last
  <run_dir>/checkpoints/latest   name of the newest published checkpoint, written after it

Publication: on a local file system everything goes into `step_XXXXXXX.tmp` and the directory is
renamed when complete. On object storage (no atomic rename) files are written in place with
metadata.json last, then `latest`; a directory without metadata, or with a file whose checksum does
not match, is never taken for a checkpoint. Checksums are verified before anything is loaded, and
loading never unpickles code (safetensors; torch.load(weights_only=True)).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .dist import DistInfo, barrier

if TYPE_CHECKING:
    from .engines import Engine

log = logging.getLogger("pretrain")
FORMAT_VERSION = 2
STEP_DIR = re.compile(r"^step_(\d{7,})$")
ENGINE_DIR = "engine"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, partial, or of another format)."""


class CheckpointLayoutError(CheckpointError):
    """A valid checkpoint that this run cannot take: never skipped silently."""


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


def _broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank (identity with one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


@dataclass
class Restored:
    step: int
    path: str
    shared: dict[str, Any]
    rank_state: dict[str, Any] | None  # None when the saved rank layout differs from this run's
    metadata: dict[str, Any]


class Checkpointer:
    def __init__(self, run_dir: str, dist_info: DistInfo, keep_last: int = 3, keep_every: int = 0) -> None:
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.root = root.rstrip("/") + "/checkpoints"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.dist = dist_info
        self.keep_last = keep_last
        self.keep_every = keep_every

    def step_path(self, step: int) -> str:
        return f"{self.root}/step_{step:07d}"

    # ---- writing ---------------------------------------------------------------------------
    def _write(self, path: str, data: bytes) -> None:
        with self.fs.open(path, "wb") as f:
            f.write(data)

    @contextlib.contextmanager
    def _local_dir(self, path: str) -> Iterator[str]:
        """A local directory for engines that write through their own file APIs (DCP, DeepSpeed):
        `path` itself on a local file system, else a staging dir uploaded (this rank's files) on exit."""
        if self.local:
            yield path
            return
        stage = tempfile.mkdtemp(prefix="ckpt-stage-")
        try:
            yield stage
            for dirpath, _, files in os.walk(stage):
                for name in files:
                    src = os.path.join(dirpath, name)
                    self.fs.put_file(src, f"{path}/{os.path.relpath(src, stage)}")
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def save(self, step: int, engine: Engine, *, shared_state: dict[str, Any], rank_state: dict[str, Any],
             metadata: dict[str, Any], config_yaml: str) -> str:
        """Collective: every rank calls it. Returns the published path."""
        final = self.step_path(step)
        work = final + ".tmp" if self.local else final
        if self.dist.is_main:
            for stale in {work, final + ".tmp"}:  # left by a crash during an earlier save of this step
                if self.fs.exists(stale):
                    self.fs.rm(stale, recursive=True)
            if not self.local and self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            self.fs.makedirs(f"{work}/{ENGINE_DIR}", exist_ok=True)
        barrier()
        weights = engine.consolidated_state_dict()  # collective: gathered onto rank 0
        with self._local_dir(f"{work}/{ENGINE_DIR}") as engine_dir:
            engine.save_state(engine_dir)
        self._write(f"{work}/rank_{self.dist.rank:05d}.pt", _torch_bytes(rank_state))
        if self.dist.is_main:
            self._write(f"{work}/model.safetensors",
                        st_save({k: v.detach().cpu().contiguous() for k, v in weights.items()}))
            self._write(f"{work}/shared.pt", _torch_bytes(shared_state))
            self._write(f"{work}/config.yaml", config_yaml.encode())
        del weights
        barrier()  # every rank's files are on storage before the checksums are taken
        if self.dist.is_main:
            files = {}
            for p in sorted(self.fs.find(work)):
                files[p[len(work) + 1:]] = _sha256(self.fs.cat_file(p))
            meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.dist.world_size,
                    "layout": engine.layout(), "time": time.time(), "files": files, **metadata}
            self._write(f"{work}/metadata.json", json.dumps(meta, indent=1).encode())
            if self.local:
                if self.fs.exists(final):  # re-saving the same step (e.g. after a resume): replace it
                    self.fs.rm(final, recursive=True)
                self.fs.mv(work, final, recursive=True)
            self._write(f"{self.root}/latest", final.rsplit("/", 1)[-1].encode())
            self._purge()
        barrier()
        return final

    def _purge(self) -> None:
        """Keep the newest `keep_last`, plus every `keep_every`-th step for the long view."""
        steps = self.list_steps()
        for step in steps[: -self.keep_last]:
            if self.keep_every and step % self.keep_every == 0:
                continue
            self.fs.rm(self.step_path(step), recursive=True)

    # ---- reading ---------------------------------------------------------------------------
    def list_steps(self) -> list[int]:
        """Published checkpoint directories (not .tmp), oldest first. Validity is checked on load."""
        if not self.fs.exists(self.root):
            return []
        steps = []
        for p in self.fs.ls(self.root, detail=False):
            m = STEP_DIR.match(p.rstrip("/").rsplit("/", 1)[-1])
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def read_metadata(self, step: int) -> dict[str, Any]:
        path = self.step_path(step)
        try:
            meta = json.loads(self.fs.cat_file(f"{path}/metadata.json"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no metadata.json (incomplete checkpoint)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}/metadata.json: not valid JSON ({e})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
        return meta

    def verify(self, step: int) -> dict[str, Any]:
        """Metadata of `step` after checking every file against its sha256 (CheckpointError if not)."""
        path = self.step_path(step)
        meta = self.read_metadata(step)
        for name, expected in meta["files"].items():
            try:
                data = self.fs.cat_file(f"{path}/{name}")
            except FileNotFoundError:
                raise CheckpointError(f"{path}/{name}: missing (checkpoint incomplete)") from None
            if _sha256(data) != expected:
                raise CheckpointError(f"{path}/{name}: checksum mismatch (file corrupt or partly written)")
        return meta

    def read_weights(self, step: int) -> dict[str, torch.Tensor]:
        return st_load(self.fs.cat_file(f"{self.step_path(step)}/model.safetensors"))

    def _newest_valid(self) -> int | None:
        """Rank 0 checks the checksums, newest first; every rank gets its answer."""
        found = None
        if self.dist.is_main:
            for step in reversed(self.list_steps()):
                try:
                    self.verify(step)
                    found = step
                    break
                except CheckpointError as e:
                    log.warning("skipping checkpoint: %s", e)
        return _broadcast_object(found)

    @contextlib.contextmanager
    def _engine_dir(self, step: int) -> Iterator[str]:
        remote = f"{self.step_path(step)}/{ENGINE_DIR}"
        if self.local:
            yield remote
            return
        stage = tempfile.mkdtemp(prefix="ckpt-load-")
        try:
            self.fs.get(remote + "/", stage + "/", recursive=True)
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def restore(self, engine: Engine) -> Restored | None:
        """Collective: load the newest valid checkpoint into `engine` (None if there is none).
        A corrupt or partial checkpoint is skipped with a warning. Across a change of world size
        or engine, the engine's own state is used when it can reshard (fsdp, single/ddp); otherwise
        the consolidated weights are loaded and the optimiser moments restart, said in a log line."""
        step = self._newest_valid()
        if step is None:
            return None
        path = self.step_path(step)
        meta = self.read_metadata(step)
        blocker = engine.resume_blocker(meta["layout"])
        if blocker is None and engine.state_has_weights:
            with self._engine_dir(step) as d:
                engine.load_state(d)
        else:
            engine.load_consolidated_state_dict(self.read_weights(step))
            if blocker is None:
                with self._engine_dir(step) as d:
                    engine.load_state(d)
            else:
                log.warning("%s: optimizer state not restored because %s; weights, schedule, step and data "
                            "position are restored and the optimizer moments restart", path, blocker)
        shared = _torch_from_bytes(self.fs.cat_file(f"{path}/shared.pt"))
        rank_state = None
        if meta["world_size"] == self.dist.world_size:
            rank_state = _torch_from_bytes(self.fs.cat_file(f"{path}/rank_{self.dist.rank:05d}.pt"))
            log.info("per-rank RNG state restored (same layout: %d ranks)", self.dist.world_size)
        else:
            log.info("per-rank RNG state not restored: saved by %d ranks, this run has %d (fresh per-rank "
                     "random streams from here on)", meta["world_size"], self.dist.world_size)
        return Restored(step=step, path=path, shared=shared, rank_state=rank_state, metadata=meta)
