"""`train.profile`: a torch.profiler trace of chosen optimiser steps, written into the run directory.

Each traced step leaves `<run.dir>/profile/rank<R>_step<S>.<time>.pt.trace.json` (tensorboard_trace_handler's
format: Chrome trace JSON, opened by https://ui.perfetto.dev or chrome://tracing as it is, and by TensorBoard
with its PyTorch profiler plugin, the optional extra `profile` (torch-tb-profiler): `tensorboard --logdir
<run.dir>/profile`) and, where CUDA is present, `rank<R>_step<S>.cuda_memory.pickle` (a CUDA caching-allocator
snapshot with the allocation stacks of that step; https://pytorch.org/memory_viz).
Steps not listed run without a profiler: no overhead.

Kineto, the profiler's C++ part, prints `USDT ... profiler_start` / `profiler_stop` lines on stderr at its
highest log level; KINETO_LOG_LEVEL=6 (above every level it has) silences them, unless the environment sets
KINETO_LOG_LEVEL already (e.g. 4 to see its errors, which that setting silences too).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Iterator, Sequence

import fsspec
import torch

from .dist import DistInfo

log = logging.getLogger("pretrain")
PROFILE_DIR = "profile"
VIEW = "https://ui.perfetto.dev, or tensorboard --logdir {url} with pip install 'mixer-pretrain[profile]'"


class StepProfiler:
    def __init__(self, run_dir: str, steps: Sequence[int], dist_info: DistInfo) -> None:
        self.steps = frozenset(int(s) for s in steps)
        self.url = f"{run_dir.rstrip('/')}/{PROFILE_DIR}"
        self.dist = dist_info
        if self.steps:  # read by kineto when a profiler starts: set before the first one
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around optimiser step `step` (1-based, as the logs count): traced when it is listed."""
        if step not in self.steps:
            yield
            return
        cuda = self.dist.device.type == "cuda"
        fs, root = fsspec.core.url_to_fs(self.url)
        local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        # The profiler writes to local files; a run dir on object storage gets them uploaded afterwards.
        out = root if local else tempfile.mkdtemp(prefix="mixer-profile-")
        os.makedirs(out, exist_ok=True)
        name = f"rank{self.dist.rank}_step{step}"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                    with_stack=False, on_trace_ready=torch.profiler.tensorboard_trace_handler(
                                        out, worker_name=name)):
            yield
            if cuda:
                torch.cuda.synchronize(self.dist.device)  # the step's kernels belong in its trace
        if cuda:
            torch.cuda.memory._dump_snapshot(os.path.join(out, f"{name}.cuda_memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        if not local:
            for file in os.listdir(out):
                fs.put_file(os.path.join(out, file), f"{root}/{file}")
        log.info("profile of step %d written to %s (view: %s)", step, self.url, VIEW.format(url=self.url))
