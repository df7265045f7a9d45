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

`latest`, metadata.json and the other small files are replaced whole (write_atomic: a temporary file
renamed over the old one locally, one PUT on object storage): a reader sees the old or the new one.

Publication: on a local file system everything goes into `step_XXXXXXX.tmp` and the directory is
renamed when complete. On object storage (no atomic rename) files are written in place with
metadata.json last, then `latest`; a directory without metadata, or with a file whose checksum does
not match, is never taken for a checkpoint. Checksums are verified before anything is loaded, and
loading never unpickles code (safetensors; torch.load(weights_only=True)).

`CheckpointReader` is the one code that lists, verifies and reads checkpoints: resume (the
`Checkpointer` is a reader that also writes), `python -m pretrain.evaluate` and `python -m pretrain.export`.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save_file as save_safetensors

from .atomic import follow_umask, write_atomic
from .dist import DistInfo, barrier
from .engines.safe_load import refusal

if TYPE_CHECKING:
    from .engines import Engine
    from .engines.base import StateWriter

log = logging.getLogger("pretrain")
FORMAT_VERSION = 2
STEP_DIR = re.compile(r"^step_(\d{7,})$")
ENGINE_DIR = "engine"
T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, partial, or of another format)."""


# What a file that passed its checksum but is not what it claims (tampered with, or written by a
# foreign version) raises while loading; each becomes one CheckpointError line.
_LOAD_ERRORS = (pickle.UnpicklingError, SafetensorError, RuntimeError, ValueError, KeyError, TypeError, EOFError)


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


def _sha256(f: Any) -> str:
    """sha256 of an open binary file (local or fsspec), read in chunks."""
    return hashlib.file_digest(f, "sha256").hexdigest()


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (dicts, lists, tuples): what torch.save will write, near enough."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _writer_bytes(state: StateWriter) -> int:
    """Bytes an engine's StateWriter will write, where its jobs are torch.save of known objects (else 0)."""
    return sum(_tensor_bytes(job.args[0]) for job in state.jobs
               if isinstance(job, functools.partial) and job.func is torch.save and job.args)


def _free_bytes(path: str) -> int:
    """Free bytes on the file system of `path` (or of its nearest existing parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path.rstrip("/"))
    return shutil.disk_usage(path or ".").free


def _no_space(exn: BaseException) -> bool:
    """A write failed for want of space: ENOSPC/EDQUOT, or torch's own words for a short write."""
    for e in (exn, exn.__cause__, exn.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = str(exn)
    return "No space left" in text or "unexpected pos" in text or "file write failed" in text


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


class CheckpointReader:
    """Lists, verifies and reads the checkpoints under `<run_dir>/checkpoints` (any fsspec URL). Needs no
    process group; every error is one CheckpointError line naming the file."""

    def __init__(self, run_dir: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.root = root.rstrip("/") + "/checkpoints"
        self.local = isinstance(self.fs, LocalFileSystem)

    @classmethod
    def locate(cls, source: str) -> tuple[CheckpointReader, int | None]:
        """A reader for `source`, a checkpoint directory (`.../checkpoints/step_XXXXXXX`: its step) or a
        run directory (None: the caller picks, e.g. `newest_valid`)."""
        fs, root = fsspec.core.url_to_fs(source)
        root = root.rstrip("/")
        if fs.exists(f"{root}/metadata.json"):
            parent, _, name = root.rpartition("/")
            m = STEP_DIR.match(name)
            if not m or not parent.endswith("/checkpoints"):
                raise CheckpointError(f"{source}: a checkpoint must sit at <run dir>/checkpoints/step_XXXXXXX")
            reader = cls(fs.unstrip_protocol(parent.removesuffix("/checkpoints")))
            return reader, int(m.group(1))
        if not fs.exists(f"{root}/checkpoints"):
            raise CheckpointError(f"{source}: neither a checkpoint (no metadata.json) nor a run dir (no checkpoints/)")
        return cls(source), None

    def step_path(self, step: int) -> str:
        return f"{self.root}/step_{step:07d}"

    def url(self, path: str) -> str:
        """`path` as the user would write it (with its s3:// etc.; local paths stay paths)."""
        return path if self.local else self.fs.unstrip_protocol(path)

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

    def read_latest(self) -> str | None:
        """The name `checkpoints/latest` gives, or None when it is missing or unreadable (said in a
        warning). Resume does not depend on it -- it takes the newest valid step directory -- but
        outside readers (scripts, dashboards) do."""
        try:
            name = self.fs.cat_file(f"{self.root}/latest").decode().strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            log.warning("%s/latest unreadable (%s); treating it as absent", self.url(self.root), e)
            return None
        if not STEP_DIR.match(name):
            log.warning("%s/latest holds %r, not a checkpoint name; treating it as absent", self.url(self.root),
                        name[:40])
            return None
        return name

    def read_metadata(self, step: int) -> dict[str, Any]:
        """metadata.json of `step`, of this code's format (CheckpointError otherwise)."""
        path = self.url(self.step_path(step))
        try:
            meta = json.loads(self.fs.cat_file(f"{self.step_path(step)}/metadata.json"))
        except FileNotFoundError:
            if not self.fs.exists(self.step_path(step)):
                raise CheckpointError(f"{path}: no such checkpoint (never written, or purged by "
                                      "checkpoint.keep_last)") from None
            raise CheckpointError(f"{path}: no metadata.json (incomplete checkpoint)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}/metadata.json: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise CheckpointError(f"{path}: format_version {version} != {FORMAT_VERSION}")
        if not isinstance(meta.get("files"), dict):
            raise CheckpointError(f"{path}/metadata.json: lists no files")
        return meta

    def _expected(self, step: int, name: str, meta: dict[str, Any]) -> str:
        expected = meta["files"].get(name)
        if expected is None:
            raise CheckpointError(f"{self.url(self.step_path(step))}/metadata.json: lists no {name}")
        return expected

    def verify(self, step: int, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
        """Metadata of `step` after checking its files against their sha256 (CheckpointError if not):
        all of them, or with `share=(i, n)` every n-th from the i-th (one rank's part of the work)."""
        path = self.url(self.step_path(step))
        meta = self.read_metadata(step)
        for name, expected in sorted(meta["files"].items())[share[0]::share[1]]:
            try:
                with self.fs.open(f"{self.step_path(step)}/{name}", "rb") as f:
                    digest = _sha256(f)
            except FileNotFoundError:
                raise CheckpointError(f"{path}/{name}: missing (checkpoint incomplete)") from None
            if digest != expected:
                raise CheckpointError(f"{path}/{name}: checksum mismatch (file corrupt or partly written)")
        return meta

    def read_file(self, step: int, name: str, meta: dict[str, Any] | None = None, check: bool = True) -> bytes:
        """The bytes of one file of `step`, checked against the sha256 in its metadata (read first
        when not given, which also checks the format version); `check=False` only for a checkpoint the
        user chose to take although it failed verification (checkpoint.resume=step_N)."""
        meta = self.read_metadata(step) if meta is None else meta
        expected = self._expected(step, name, meta)
        path = f"{self.url(self.step_path(step))}/{name}"
        try:
            data = self.fs.cat_file(f"{self.step_path(step)}/{name}")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (checkpoint incomplete)") from None
        if check and hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"{path}: checksum mismatch (file corrupt or partly written)")
        return data

    def read_weights(self, step: int, meta: dict[str, Any] | None = None,
                     check: bool = True) -> dict[str, torch.Tensor]:
        """The consolidated fp32 weights of `step` (model.safetensors, verified; no pickle involved)."""
        data = self.read_file(step, "model.safetensors", meta, check)
        try:
            return st_load(data)
        except SafetensorError as e:
            raise CheckpointError(f"{self.url(self.step_path(step))}/model.safetensors: cannot be loaded: "
                                  f"SafetensorError: {e}") from None

    def read_config(self, step: int, meta: dict[str, Any] | None = None) -> str:
        """The resolved config (YAML text) of the run that wrote `step`, verified."""
        data = self.read_file(step, "config.yaml", meta)
        try:
            return data.decode()
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.url(self.step_path(step))}/config.yaml: not text ({e})") from None

    def newest_valid(self, check: Callable[[int], T] | None = None, steps: list[int] | None = None,
                     skipped: Callable[[str], None] | None = None) -> tuple[int, T] | None:
        """The newest of `steps` (default: all) that `check` (default: `verify`) accepts, with what it
        returned; each one it refuses (CheckpointError) is passed to `skipped` (default: a warning)."""
        check = check or self.verify
        skipped = skipped or (lambda error: log.warning("skipping checkpoint: %s", error))
        for step in reversed(self.list_steps() if steps is None else steps):
            try:
                return step, check(step)
            except CheckpointError as e:
                skipped(str(e))
        return None


class Checkpointer(CheckpointReader):
    """Collective save / restore of a whole run's state (every rank calls `save` and `restore`).

    With `async_save`, `save` copies the state off the device and returns; serialising, hashing
    and publishing happen on a checkpoint thread while training goes on, one save at a time (the next
    `save`, and `wait`, block until the previous one is published and re-raise its error). The
    thread's collectives use a gloo group of their own, so they never interleave with the training
    loop's. Every rank hashes the files it wrote itself, before publishing them, so no rank re-reads
    the checkpoint; verification on load is likewise split across ranks."""

    def __init__(self, run_dir: str, dist_info: DistInfo, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = False) -> None:
        super().__init__(run_dir)
        self.dist = dist_info
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.group = dist.new_group(backend="gloo") if dist.is_available() and dist.is_initialized() else None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if async_save else None
        self._pending: Future | None = None

    # ---- collectives on the checkpoint group (identity with one process) --------------------
    def _all_gather(self, obj: Any) -> list[Any]:
        if self.group is None or self.dist.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    # ---- writing ---------------------------------------------------------------------------
    def _write(self, path: str, data: bytes) -> None:
        write_atomic(self.fs, path, data)

    def _stage_dir(self, work: str) -> str:
        """Where this rank writes its files before they are hashed and published: beside the
        checkpoint on a local file system (publishing is a rename), else a local temporary dir."""
        stage = f"{work}/.stage/rank_{self.dist.rank:05d}" if self.local else tempfile.mkdtemp(prefix="ckpt-stage-")
        os.makedirs(f"{stage}/{ENGINE_DIR}", exist_ok=True)
        return stage

    def save(self, step: int, engine: Engine, *, shared_state: dict[str, Any], rank_state: dict[str, Any],
             metadata: dict[str, Any], config_yaml: str) -> str:
        """Collective: every rank calls it. Returns the path the checkpoint is published at, at once
        or (async_save) once the checkpoint thread is done."""
        self.wait()
        final = self.step_path(step)
        work = final + ".tmp" if self.local else final
        if self.dist.is_main:
            for stale in {work, final + ".tmp"}:  # left by a crash during an earlier save of this step
                if self.fs.exists(stale):
                    self.fs.rm(stale, recursive=True)
            if not self.local and self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            self.fs.makedirs(work, exist_ok=True)
        barrier()
        stage = self._stage_dir(work)
        # Everything below is a host copy of this step's state: training may go on once it is taken.
        weights = engine.consolidated_state_dict()  # collective: gathered onto rank 0
        state = engine.snapshot_state(f"{stage}/{ENGINE_DIR}", background=self.async_save, group=self.group)
        small = {f"rank_{self.dist.rank:05d}.pt": _torch_bytes(rank_state)}
        if self.dist.is_main:
            small.update({"shared.pt": _torch_bytes(shared_state), "config.yaml": config_yaml.encode()})
        meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.dist.world_size,
                "layout": engine.layout(), "time": time.time(), **metadata}
        job = functools.partial(self._write_and_publish, final, work, stage, state, weights, small, meta)
        if self._thread is None:
            job()
        else:
            self._pending = self._thread.submit(job)
        return self.url(final)

    def wait(self) -> None:
        """Block until the save under way on the checkpoint thread is published; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def failed(self) -> bool:
        """Whether the save on the checkpoint thread has ended in an error (local, no waiting). The
        trainer asks at every step boundary and stops on every rank (`wait` raises the same line on each)."""
        pending = self._pending
        return pending is not None and pending.done() and pending.exception() is not None

    def _write_and_publish(self, final: str, work: str, stage: str, state: StateWriter,
                           weights: dict[str, torch.Tensor], small: dict[str, bytes], meta: dict[str, Any]) -> None:
        """Write this rank's files, hash them, move them into the checkpoint; then rank 0 writes the
        metadata and publishes. Every rank takes part in both agreements even after a failure of its
        own, so a failed save raises on all ranks instead of leaving some waiting."""
        t0, files, error = time.perf_counter(), {}, None
        needed = _tensor_bytes(weights) + sum(map(len, small.values())) + _writer_bytes(state)
        free = _free_bytes(stage)
        try:
            if needed > free:  # say so before writing a byte, rather than fill the disk and fail half-way
                raise OSError(errno.ENOSPC, "not enough space for this checkpoint")
            state.finish()
            if weights:
                save_safetensors({k: v.contiguous() for k, v in weights.items()}, f"{stage}/model.safetensors")
                follow_umask(f"{stage}/model.safetensors")  # safetensors creates it 0600
            for name, data in small.items():
                with open(f"{stage}/{name}", "wb") as f:
                    f.write(data)
            files = self._publish_stage(stage, work)
        except Exception as e:  # noqa: BLE001 -- reported to every rank below
            error = f"rank {self.dist.rank}: {type(e).__name__}: {e}"
            if _no_space(e):
                where = self.url(self.root) if self.local else f"{stage} (local staging)"
                error = (f"rank {self.dist.rank}: no space left on the device of {where}: this rank's files need "
                         f"{needed:,} bytes, {free:,} were free ({type(e).__name__}: {str(e)[:120]})")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        results = self._all_gather((files, error))
        errors = [e for _, e in results if e]
        if not errors and self.dist.is_main:
            try:
                meta["files"] = dict(sorted(kv for rank_files, _ in results for kv in rank_files.items()))
                self._write(f"{work}/metadata.json", json.dumps(meta, indent=1).encode())
                if self.local:
                    self.fs.rm(f"{work}/.stage", recursive=True)
                    if self.fs.exists(final):  # re-saving the same step (e.g. after a resume): replace it
                        self.fs.rm(final, recursive=True)
                    self.fs.mv(work, final, recursive=True)
                self._write(f"{self.root}/latest", final.rsplit("/", 1)[-1].encode())
                self._purge(meta["step"])
            except Exception as e:  # noqa: BLE001
                error = f"rank 0: {type(e).__name__}: {e}"
        errors = errors or [e for e in self._all_gather(error) if e]
        if errors:
            if self.dist.is_main:  # what was written of it only takes space (never published: no metadata)
                with contextlib.suppress(Exception):
                    if self.fs.exists(work) and not self.fs.exists(f"{work}/metadata.json"):
                        self.fs.rm(work, recursive=True)
            self._all_gather(None)  # every rank reads `latest` after the clean-up: the same line on each
            latest = self.read_latest()
            kept = f"{latest} stays latest" if latest else "no earlier checkpoint exists"
            raise CheckpointError(f"{self.url(final)}: checkpoint not saved ({errors[0]}); {kept}")
        if self.dist.is_main:
            log.info("checkpoint %s published (files written in %.1fs%s)", self.url(final), time.perf_counter() - t0,
                     " on the checkpoint thread" if self._thread else "")

    def _publish_stage(self, stage: str, work: str) -> dict[str, str]:
        """sha256 of each staged file (read back from the page cache, once, by the rank that wrote it),
        then the file moved into the checkpoint: a rename locally, an upload to object storage."""
        files = {}
        for dirpath, _, names in os.walk(stage):
            for name in names:
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, stage).replace(os.sep, "/")
                with open(src, "rb") as f:
                    files[rel] = _sha256(f)
                if self.local:
                    os.makedirs(os.path.dirname(f"{work}/{rel}"), exist_ok=True)
                    os.replace(src, f"{work}/{rel}")
                else:
                    self.fs.put_file(src, f"{work}/{rel}")
        return files

    def _purge(self, saved: int | None = None) -> None:
        """Keep the newest `keep_last`, plus every `keep_every`-th step for the long view. Only checkpoints
        older than `saved`, the one just published, are candidates: a later step's directory (left by a run
        that went further, e.g. before a resume from an older checkpoint) is superseded by nothing yet and
        stays. Also drops the `.tmp` directories of saves that a crash interrupted (this save's was renamed
        already)."""
        steps = self.list_steps()
        saved = steps[-1] if saved is None and steps else saved  # None: the newest is the one just published
        older = [step for step in steps if saved is not None and step < saved]
        for step in older[: max(0, len(older) - (self.keep_last - 1))]:
            if self.keep_every and step % self.keep_every == 0:
                continue
            self.fs.rm(self.step_path(step), recursive=True)
        if self.local:
            for p in self.fs.ls(self.root, detail=False):
                name = p.rstrip("/").rsplit("/", 1)[-1]
                stale_save = STEP_DIR.match(name.removesuffix(".tmp")) and name.endswith(".tmp")
                stale_marker = name.startswith(".latest.") and name.endswith(".tmp")  # a killed write_atomic
                if stale_save or stale_marker:
                    self.fs.rm(p, recursive=True)

    # ---- reading (listing, verifying and reading are CheckpointReader's) ------------------------
    def _newest_valid(self, steps: list[int], failures: list[str]) -> tuple[int, dict[str, Any]] | None:
        """Collective: the newest of `steps` whose files all match their checksums, with its metadata,
        each rank checking its share of the files; a bad one is skipped with a warning and its error
        appended to `failures` (on every rank)."""
        def check(step: int) -> dict[str, Any]:
            meta, error = None, None
            try:
                meta = self.verify(step, share=(self.dist.rank, self.dist.world_size))
            except CheckpointError as e:
                error = str(e)
            errors = [e for e in self._all_gather(error) if e]
            if errors:
                raise CheckpointError(errors[0])
            return meta

        def skipped(error: str) -> None:
            failures.append(error)
            if self.dist.is_main:
                log.warning("skipping checkpoint: %s", error)

        return self.newest_valid(check, steps, skipped=skipped)

    def _choose(self, pick: int | None) -> tuple[int, dict[str, Any], bool] | None:
        """Collective: (step, metadata, verified) of the checkpoint to resume from, or None when the run
        dir holds none. Without `pick`: the newest that verifies. With `pick` (checkpoint.resume=step_N):
        the newest verified one at or after it -- a requeued run continues from what it saved since --
        else that one, although it failed verification. Nothing is deleted or written here: when
        checkpoints exist and none verifies, one CheckpointError lists each and names the ways out."""
        steps = _broadcast_object(self.list_steps() if self.dist.is_main else None)
        root = self.url(self.root)
        if pick is not None and pick not in steps:
            held = ", ".join(f"step_{s:07d}" for s in steps) or "none"
            raise CheckpointError(f"checkpoint.resume=step_{pick:07d}: no such checkpoint in {root} "
                                  f"(it holds: {held})")
        if not steps:
            return None
        failures: list[str] = []
        found = self._newest_valid([s for s in steps if pick is None or s >= pick], failures)
        if found is not None:
            return (*found, True)
        if pick is None and not self.local and not _broadcast_object(
                [s for s in steps if self.fs.exists(f"{self.step_path(s)}/metadata.json")] if self.dist.is_main
                else None):
            # On object storage files are written in place and metadata.json last: directories without
            # it are saves a kill interrupted before publication, not checkpoints.
            log.info("%s holds only unpublished saves (no metadata.json); starting from step 0", root)
            return None
        if pick is None:
            raise CheckpointError(
                f"no checkpoint in {root} verifies, so none is resumed and nothing there is changed: "
                f"{'; '.join(failures)}. To resume from one anyway: checkpoint.resume=step_{steps[-1]:07d} "
                "(or another step); to start afresh: a new run.dir")
        try:
            meta = self.read_metadata(pick)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint.resume=step_{pick:07d} cannot be taken even unverified: {e}") from None
        if self.dist.is_main:
            log.warning("resuming from %s although it failed verification (%s), as checkpoint.resume=step_%07d "
                        "asks; its files are loaded without checksums (still never as code)",
                        self.url(self.step_path(pick)), failures[0], pick)
        return pick, meta, False

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

    def restore(self, engine: Engine, pick: int | None = None) -> Restored | None:
        """Collective: load the newest valid checkpoint (or `pick`'s, see `_choose`) into `engine` (None if
        there is none). A corrupt or partial checkpoint is skipped with a warning; when every one is, the
        resume stops with one line (CheckpointError) and nothing is written. The engine's own state is used
        whenever it can be resharded onto this run (any world size; DeepSpeed also across ZeRO
        stages); across a change of engine the consolidated weights are loaded and the optimiser
        moments restart, said in a log line."""
        found = self._choose(pick)
        if found is None:
            return None
        step, meta, verified = found
        path = self.step_path(step)
        if self.dist.is_main and self.read_latest() not in (None, path.rsplit("/", 1)[-1]):
            log.info("%s/latest names another checkpoint; resuming from the newest valid one", self.url(self.root))
        try:
            return self._load(engine, step, meta, verified)
        except CheckpointError as e:  # weights that do not parse, or a file changed since it was verified
            raise CheckpointError(f"{e}; refusing to resume from it") from None
        except _LOAD_ERRORS as e:
            log.debug("loading %s failed", path, exc_info=True)
            raise CheckpointError(f"{self.url(path)}: cannot be loaded, refusing to resume from it: "
                                  f"{type(e).__name__}: {refusal(e)}") from None

    def _load(self, engine: Engine, step: int, meta: dict[str, Any], check: bool = True) -> Restored:
        path = self.step_path(step)
        blocker = engine.resume_blocker(meta["layout"])
        if blocker is not None:
            engine.load_consolidated_state_dict(self.read_weights(step, meta, check))
            log.warning("%s: optimizer state not restored because %s; weights, schedule, step and data "
                        "position are restored and the optimizer moments restart", self.url(path), blocker)
        else:
            if not engine.state_has_weights:
                engine.load_consolidated_state_dict(self.read_weights(step, meta, check))
            with self._engine_dir(step) as d:
                engine.load_state(d, meta["layout"])
        shared = _torch_from_bytes(self.read_file(step, "shared.pt", meta, check))
        rank_state = None
        if meta["world_size"] == self.dist.world_size:
            rank_state = _torch_from_bytes(self.read_file(step, f"rank_{self.dist.rank:05d}.pt", meta, check))
            log.info("per-rank RNG state restored (same layout: %d ranks)", self.dist.world_size)
        else:
            log.info("per-rank RNG state not restored: saved by %d ranks, this run has %d (fresh per-rank "
                     "random streams from here on)", meta["world_size"], self.dist.world_size)
        return Restored(step=step, path=self.url(path), shared=shared, rank_state=rank_state, metadata=meta)
