"""The one owner of run metrics: console progress lines, TensorBoard scalars and (monitor.wandb) the same
scalars in Weights & Biases, rank 0 only. `ScalarWriter` is the one TensorBoard writer (the evaluation CLI
writes through it as well); `WandbWriter` the optional W&B one. Every scalar goes through `Monitor.scalars`,
which hands it to each writer: the two never disagree on names or steps.

Per-step values are accumulated as device tensors and read back (one host sync) only when a log
line is due, so logging never stalls the accelerator between steps.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import secrets
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Protocol

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from .atomic import write_atomic
from .dist import DistInfo, all_reduce_mean

log = logging.getLogger("pretrain")


UPLOAD_EVERY_S = 60.0


def itstime(step: int, every: int, total_steps: int) -> bool:
    """The one 'is it time?' rule for logging, checkpointing and evaluating: every `every` steps
    (counted 1-based) and always at the last step."""
    return step == total_steps or (every > 0 and step % every == 0)


# Dense peak TFLOP/s per device by name (vendor data sheets, without sparsity), for MFU.
# Half precision = bf16/fp16 tensor cores; fp32 = TF32 tensor cores (what fp32 matmuls use on
# Ampere+ with allow_tf32, else an optimistic peak).
PEAK_TFLOPS = {  # name substring: (half, fp32)
    "H200": (989.0, 494.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.0),  # SXM
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10G": (70.0, 35.0),
    "V100": (125.0, 15.7),
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for `precision`, None when the device is not in the table."""
    for key, (half, fp32) in PEAK_TFLOPS.items():
        if key in device_name:
            return half if precision in ("bf16", "fp16") else fp32
    return None


def max_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB): host memory on every device, CPU runs included.
    Data-loader workers are processes of their own and are not counted. On Linux this is the address space's
    own high-water mark (``VmHWM``): ``ru_maxrss`` survives ``exec`` and so reports the parent's peak when the
    parent was larger (a launcher, a test runner) than this process will ever be."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


class ScalarWriter:
    """The one TensorBoard writer: scalars into `<run_dir>/tb` on any fsspec storage (training's Monitor and
    `python -m pretrain.evaluate` both write through it). TensorBoard's own writer has no fsspec, so on
    object storage the event files are written locally and uploaded whole (they are small), at most every
    `upload_every_s` and on close: TensorBoard pointed at the remote run dir lags by about that much. The
    event file is opened at the first scalars, so a process that has none to write leaves none."""

    def __init__(self, run_dir: str, upload_every_s: float = UPLOAD_EVERY_S) -> None:
        self.fs, root = fsspec.core.url_to_fs(run_dir)
        self.tb_dir = f"{root}/tb"
        self.upload_every_s = upload_every_s
        self.local_dir = self.tb_dir if isinstance(self.fs, LocalFileSystem) else None  # None: made on open
        self.writer = None
        self._uploaded = -math.inf

    @property
    def remote(self) -> bool:
        return not isinstance(self.fs, LocalFileSystem)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported late: slow
            if self.remote:
                self.local_dir = tempfile.mkdtemp(prefix="tb-")
            self.writer = SummaryWriter(log_dir=self.local_dir)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        if time.monotonic() - self._uploaded >= self.upload_every_s:
            self._upload()

    def _upload(self) -> None:
        if not self.remote or self.local_dir is None:
            return
        for name in os.listdir(self.local_dir):
            self.fs.put_file(os.path.join(self.local_dir, name), f"{self.tb_dir}/{name}")
        self._uploaded = time.monotonic()

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self._upload()
        if self.remote:
            shutil.rmtree(self.local_dir, ignore_errors=True)
        self.writer = None


def fmt_rate(per_s: float) -> str:
    """A throughput readable at any size: 1234, 12.3, 0.12 (a slow CPU run is not '0 img/s')."""
    if per_s >= 100:
        return f"{per_s:.0f}"
    return f"{per_s:.1f}" if per_s >= 1 else f"{per_s:.2g}"


class Writer(Protocol):
    def write(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


WANDB_ID_FILE = "wandb_run_id"  # in the run dir: the W&B run a resumed training run goes on in
WANDB_ID_FILES = {"train": WANDB_ID_FILE, "eval": "wandb_eval_run_id"}  # python -m pretrain.evaluate: its own run
WANDB_INSTALL = "pip install -c constraints.txt 'mixer-pretrain[wandb]' (or pip install wandb)"


class WandbWriter:
    """monitor.wandb: the scalars TensorBoard gets, with the same names and steps (`step` is their x-axis in
    W&B, so a resumed run may log a step again), the run's resolved config, and each evaluation record (its
    metrics into the run summary, its rows into the `eval/records` table). The W&B run id is kept in
    `<run_dir>/wandb_run_id`: a resumed training run continues the same W&B run. `python -m pretrain.evaluate`
    (``job="eval"``) logs the same way into a run of its own (`<run_dir>/wandb_eval_run_id`), in the training
    run's group: W&B takes one writer per run, and the evaluator may run beside training. W&B's local files go under
    WANDB_DIR if set, else into the run dir (when it is local). WANDB_MODE=offline logs without a network."""

    def __init__(self, run_dir: str, config: Mapping[str, Any], project: str = "", entity: str = "",
                 name: str = "", job: str = "train") -> None:
        import wandb  # optional: build_monitor checks that it is there

        fs, root = fsspec.core.url_to_fs(run_dir)
        root = root.rstrip("/")
        run_id = self._run_id(fs, root, WANDB_ID_FILES[job])
        # Training and `python -m pretrain.evaluate` are separate W&B runs (W&B takes one writer per run, and the
        # two may run at once), grouped under the training run's id.
        group = run_id if job == "train" else self._run_id(fs, root, WANDB_ID_FILES["train"])
        name = name or os.environ.get("WANDB_NAME") or ""
        if name and job != "train":
            name = f"{name}-{job}"
        local = isinstance(fs, LocalFileSystem)
        kwargs = {"dir": root} if local and not os.environ.get("WANDB_DIR") else {}
        self.run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "mixer-pretrain",
                              entity=entity or None, name=name or None, id=run_id, resume="allow", group=group,
                              job_type=job, config=dict(config), **kwargs)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self._table = wandb.Table
        self.rows: list[list] = []
        log.info("W&B run %s (%s, %s mode): %s", run_id, job, self.run.settings.mode, self.run.url or self.run.dir)

    @staticmethod
    def _run_id(fs: Any, root: str, file: str) -> str:
        """The W&B run id kept in ``<run_dir>/<file>``, made on first use: a resumed process goes on in its run."""
        path = f"{root}/{file}"
        if fs.exists(path):
            return fs.cat_file(path).decode().strip()
        run_id = secrets.token_hex(6)  # W&B run ids: letters and digits
        fs.makedirs(root, exist_ok=True)
        write_atomic(fs, path, run_id.encode())
        return run_id

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({**values, "step": step})

    def record(self, record: Mapping[str, Any]) -> None:
        """One evaluation record (pretrain/evaluation/records.py): its metrics are the run's latest in the
        summary, and its rows join the `eval/records` table (logged whole each time, as W&B tables are)."""
        for name, results in record["results"].items():
            self.run.summary.update({f"eval/{name}/{k}": v for k, v in results.items()})
            self.rows += [[record["step"], record["checkpoint"], name, k, float(v), ""] for k, v in results.items()]
        self.rows += [[record["step"], record["checkpoint"], name, "", None, error]
                      for name, error in record.get("errors", {}).items()]
        table = self._table(columns=["step", "checkpoint", "evaluator", "metric", "value", "error"], data=self.rows)
        self.run.log({"eval/records": table, "step": record["step"]})

    def close(self) -> None:
        self.run.finish()


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def headline(record: Mapping[str, Any]) -> str:
    """An evaluation record in a few numbers: each evaluator's top-1 (few-shot: its most shots), or its first."""
    parts = []
    for name, results in record.get("results", {}).items():
        shots = sorted((k for k in results if k.endswith("shot") and k[:-4].isdigit()), key=lambda k: int(k[:-4]))
        key = "top1" if "top1" in results else (shots[-1] if shots else next(iter(results), None))
        if key is not None:
            parts.append(f"{name} {key} {results[key]:.4g}")
    parts += [f"{name} failed" for name in record.get("errors", {})]
    return ", ".join(parts) or "no results"


class Monitor:
    def __init__(self, run_dir: str, dist_info: DistInfo, total_steps: int, log_every: int,
                 global_batch_size: int, flops_per_image: int | None = None, precision: str = "fp32",
                 wandb: Callable[[], WandbWriter] | None = None) -> None:
        """``wandb``: makes the W&B writer (rank 0 only calls it); None: TensorBoard alone."""
        self.dist = dist_info
        self.total_steps = total_steps
        self.log_every = log_every
        self.global_batch_size = global_batch_size
        self.flops_per_image = flops_per_image
        self.device_name = (torch.cuda.get_device_name(dist_info.device) if dist_info.device.type == "cuda"
                            else "cpu")
        self.peak_tflops = peak_tflops(self.device_name, precision)
        self.loss_scale = 1.0
        self.skipped = 0
        self.run_dir = run_dir
        self.writers: list[Writer] = []
        self.wandb: WandbWriter | None = None
        if dist_info.is_main:
            self.writers.append(ScalarWriter(run_dir))
            if wandb is not None:
                self.wandb = wandb()
                self.writers.append(self.wandb)
        self.started = time.monotonic()
        self.last_loss: float | None = None  # the mean loss of the last logged interval
        self.last_eval: Mapping[str, Any] | None = None
        if dist_info.is_main:
            log.info("device %s: peak %s TFLOP/s for %s (MFU %s)", self.device_name, self.peak_tflops or "unknown",
                     precision, "logged" if self.peak_tflops else "not logged: device not in the peak table")
        self._reset()

    def _reset(self) -> None:
        self._loss_sum: torch.Tensor | None = None
        self._gnorm_sum: torch.Tensor | None = None
        self._steps = 0
        self._data_wait = 0.0
        self._t0 = time.perf_counter()

    def pause(self, seconds: float) -> None:
        """Exclude time spent checkpointing/evaluating from the throughput figure."""
        self._t0 += seconds

    def skipped_step(self, step: int) -> None:
        """A step whose update was skipped (bad loss): counted and logged, not averaged in."""
        self.skipped += 1
        self.scalars(step, {"train/skipped_steps": self.skipped})

    def step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
             data_wait_s: float, loss_scale: float | Callable[[], float] = 1.0) -> None:
        """`loss_scale` may be a callable: GradScaler's scale is a device tensor, read on log steps only."""
        # DeepSpeed's grad norm is a host float; the sums live where the loss does.
        loss, grad_norm = loss.detach().float(), grad_norm.detach().float().to(loss.device)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._gnorm_sum = grad_norm if self._gnorm_sum is None else self._gnorm_sum + grad_norm
        self._steps += 1
        self._data_wait += data_wait_s
        if not itstime(step, self.log_every, self.total_steps):
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        self.loss_scale = loss_scale() if callable(loss_scale) else loss_scale
        # The only host sync of the interval; the loss is averaged over ranks for an honest figure.
        means = all_reduce_mean(torch.stack([self._loss_sum, self._gnorm_sum]) / self._steps).tolist()
        self.last_loss = means[0]
        imgs_per_s = self._steps * self.global_batch_size / elapsed
        scalars = {
            "train/loss": means[0],
            "train/grad_norm": means[1],
            "train/lr": lr,
            "perf/img_per_s": imgs_per_s,
            "perf/img_per_s_per_device": imgs_per_s / self.dist.world_size,
            "perf/data_wait_frac": min(1.0, self._data_wait / elapsed),
            "perf/data_wait_s_per_step": self._data_wait / self._steps,
            "perf/compute_s_per_step": max(0.0, elapsed - self._data_wait) / self._steps,
            "train/loss_scale": self.loss_scale,
        }
        if self.flops_per_image:
            # Training FLOPs = 3x forward (backward costs two forwards).
            tflops = 3 * self.flops_per_image * imgs_per_s / self.dist.world_size / 1e12
            scalars["perf/tflops_per_device"] = tflops
            if self.peak_tflops:
                scalars["perf/mfu"] = tflops / self.peak_tflops
                scalars["perf/peak_tflops"] = self.peak_tflops
        scalars["perf/max_rss_gib"] = max_rss_gib()  # host memory: the figure a CPU run has
        if self.dist.device.type == "cuda":
            scalars["perf/max_mem_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        eta = (self.total_steps - step) * elapsed / self._steps
        if self.dist.is_main:
            extra = "".join([f"  mfu {scalars['perf/mfu']:.1%}" if "perf/mfu" in scalars else "",
                             f"  mem {scalars['perf/max_mem_gib']:.1f}G" if "perf/max_mem_gib" in scalars else "",
                             f"  rss {scalars['perf/max_rss_gib']:.1f}G",
                             f"  scale {self.loss_scale:g}" if self.loss_scale != 1.0 else ""])
            log.info("step %d/%d  loss %.4f  lr %.2e  gnorm %.3f  %s img/s  data %.0f%%%s  eta %s",
                     step, self.total_steps, means[0], lr, means[1], fmt_rate(imgs_per_s),
                     100 * scalars["perf/data_wait_frac"], extra, _fmt_duration(eta))
            self.scalars(step, scalars)
        self._reset()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for writer in self.writers:
            writer.write(step, values)

    def eval_record(self, record: Mapping[str, Any]) -> None:
        """An evaluation's record (rank 0): kept for the run's last lines, and sent to W&B."""
        self.last_eval = record
        if self.wandb is not None:
            self.wandb.record(record)

    def summary(self, step: int, start_step: int) -> list[str]:
        """The run's last lines: wall time, steps, final loss, the last evaluation and where the records are."""
        wall = _fmt_duration(time.monotonic() - self.started)
        loss = f"final loss {self.last_loss:.4f}" if self.last_loss is not None else "no step logged"
        resumed = f" (this run from step {start_step})" if start_step else ""
        lines = [f"done: {step} steps{resumed} in {wall}, {loss}"]
        where = [f"checkpoints {self.run_dir}/checkpoints"]
        if self.last_eval is not None:
            lines.append(f"last evaluation (step {self.last_eval['step']}): {headline(self.last_eval)}")
            where.append(f"evaluations {self.run_dir}/eval/results.jsonl (python -m pretrain.evaluate {self.run_dir} "
                         "--summary)")
        where.append(f"TensorBoard: tensorboard --logdir {self.run_dir}/tb")
        if self.wandb is not None:
            where.append(f"W&B: {self.wandb.run.url or self.wandb.run.dir}")
        lines.append("records: " + "; ".join(where))
        return lines

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []
