"""Evaluation records of a run, under `<run_dir>/eval/` on any fsspec storage:

  step_XXXXXXX.json   one record per evaluated checkpoint (written atomically: temp name, then move)
  results.jsonl       the same records appended in evaluation order (a history for tools)
  claims/step_XXXXXXX.claim   a watcher is evaluating this step now (host, pid, time)

A step counts as evaluated once its step file exists, so every way of running evaluation (inline,
watcher, SLURM job) agrees on what is done.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
from typing import Iterator

import fsspec

from ..atomic import write_atomic

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"^step_(\d{7,})\.json$")
HALF_WRITTEN_CLAIM_S = 60.0  # an unreadable claim younger than this is still being written by its owner


class EvalRecords:
    def __init__(self, run_dir: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.root = root.rstrip("/") + "/eval"

    def path(self, step: int) -> str:
        return f"{self.root}/step_{step:07d}.json"

    def has(self, step: int) -> bool:
        return self.fs.exists(self.path(step))

    def write(self, record: dict) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        final = self.path(record["step"])
        write_atomic(self.fs, final, json.dumps(record, indent=1).encode())  # whole or absent: `has` trusts it
        try:  # a convenience history; the step files above are the record of what is done
            with self.fs.open(f"{self.root}/results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except (NotImplementedError, ValueError, OSError) as e:  # object stores cannot append
            log.warning("results.jsonl not updated (%s); the record is in %s", e, final)

    def steps(self) -> list[int]:
        if not self.fs.exists(self.root):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        return sorted(int(m.group(1)) for m in map(STEP_FILE.match, names) if m)

    def read(self, step: int) -> dict:
        with self.fs.open(self.path(step), "r") as f:
            return json.load(f)

    def all(self) -> Iterator[dict]:
        for step in self.steps():
            yield self.read(step)

    # ---- claims: so that two watchers never evaluate the same checkpoint twice ---------------
    def _claim_path(self, step: int) -> str:
        return f"{self.root}/claims/step_{step:07d}.claim"

    def claim(self, step: int, stale_after_s: float) -> bool:
        """Take the claim on `step`; False if another live evaluator holds it. Exclusive creation
        makes this atomic on local and network file systems; object stores without conditional
        writes give best effort only (run one watcher per run there)."""
        path = self._claim_path(step)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        for _ in range(2):
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(json.dumps(me).encode())
                return True
            except FileExistsError:
                if not self._stale(path, stale_after_s):
                    return False
                self.fs.rm(path)  # its owner died or gave up: take it over
            except (ValueError, NotImplementedError):  # no exclusive create here: check, then write
                if self.fs.exists(path) and not self._stale(path, stale_after_s):
                    return False
                with self.fs.open(path, "wb") as f:
                    f.write(json.dumps(me).encode())
                return True
        return False

    def _stale(self, path: str, stale_after_s: float) -> bool:
        try:
            with self.fs.open(path, "rb") as f:
                owner = json.loads(f.read())
        except FileNotFoundError:
            return True  # released meanwhile: try again
        except json.JSONDecodeError:
            # Empty or half-written: its owner is between creating and writing it (a few ms; a rival
            # watcher that took it over then would evaluate the step twice), or died right there.
            return self._age_s(path) > HALF_WRITTEN_CLAIM_S
        if time.time() - owner.get("time", 0) > stale_after_s:
            return True
        if owner.get("host") == socket.gethostname():  # same machine: we can tell if it is alive
            try:
                os.kill(int(owner["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def _age_s(self, path: str) -> float:
        try:
            return time.time() - self.fs.modified(path).timestamp()
        except (FileNotFoundError, NotImplementedError):
            return math.inf

    def release(self, step: int) -> None:
        try:
            self.fs.rm(self._claim_path(step))
        except FileNotFoundError:
            pass
