"""The Trainer: builds every component once, then runs a loop that fits on one screen."""
from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Iterator

import fsspec
import torch
from omegaconf import DictConfig

from data_pipeline.storage import RetryInterrupted, interrupt_retries_when

from . import build
from .atomic import write_atomic
from .checkpoint import capture_rng, restore_rng
from .config import ConfigError, to_yaml
from .dist import broadcast, describe_world, init_distributed, shutdown
from .faults import Preempted, Stop
from .monitor import itstime

log = logging.getLogger("pretrain")


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Trainer:
    def __init__(self, cfg: DictConfig, config_source: str = "config", local_rank: int | None = None) -> None:
        self.cfg = cfg = build.replica_group_run_dir(cfg)
        self.dist = init_distributed(cfg.train.device, cfg.engine.backend, local_rank)
        self.lease = None
        try:
            self._build(cfg, config_source)
        except BaseException:
            if self.lease is not None:
                self.lease.release()
            shutdown()  # a start that fails leaves no process group behind: the caller may report and start again
            raise

    def _build(self, cfg: DictConfig, config_source: str) -> None:
        logging.basicConfig(level=logging.INFO if self.dist.is_main else logging.WARNING,
                            format=f"%(asctime)s [rank {self.dist.rank}] %(message)s", datefmt="%H:%M:%S",
                            force=True)
        if self.dist.distributed:  # multi-node: which node holds which ranks (a lone process: nothing to say)
            log.info("process group: %s", describe_world(self.dist))
        self.run_dir = cfg.run.dir
        self.lease = build.build_run_lease(cfg, self.dist)  # before anything is written to the run dir
        self.micro_batch_size, self.accum_steps = build.batch_layout(cfg, self.dist, config_source)
        self.batch_size = self.micro_batch_size * self.accum_steps  # per rank per optimiser step
        build.check_model_config(cfg, config_source)  # a bad model setting is found before any data is touched
        storage = build.build_storage(cfg)  # the one handle every data read goes through
        build.prepare_data(cfg, self.dist, storage, config_source)
        # Every data path (training, val, each evaluator's) fails here, before anything is allocated.
        build.check_data(cfg, storage, config_source)
        self.cfg = cfg = build.resolve_num_classes(cfg, storage, config_source)  # model.num_classes: auto
        # train.precision auto: bf16 on a GPU that runs it, fp32 on a CPU; logged once, after the start
        # checks, so that a run stopped by one of them says only why.
        self.cfg = cfg = build.resolve_precision(cfg, self.dist.device, config_source, announce=self.dist.is_main)
        # Before anything large is allocated: a run that cannot fit says so in its first lines, and stops.
        line, estimate = build.memory_estimate(cfg, self.dist.world_size, config_source,
                                               device_type=self.dist.device.type, rank=self.dist.rank)
        log.info("memory estimate: %s", line)
        build.check_memory_fit(cfg, estimate, self.dist, config_source)
        # Same seed on every rank for the weights (DDP also broadcasts rank 0's), then a per-rank
        # seed so that dropout / drop-path masks differ between ranks.
        torch.manual_seed(cfg.train.seed)
        model = build.build_model(cfg, config_source)
        torch.manual_seed(cfg.train.seed + 1000 * (self.dist.rank + 1))
        n_params = sum(p.numel() for p in model.parameters())
        self.loader = build.build_train_loader(cfg, self.dist, self.micro_batch_size, storage)
        self.engine = build.build_train_engine(cfg, model, self.dist, config_source, loader=self.loader)
        self.loss_fn = build.build_train_loss(cfg)
        self.guard = build.build_loss_guard(cfg)
        self.to_device = build.build_batch_to_device(cfg, self.dist)
        self.checkpointer = build.build_checkpointer(cfg, self.dist)
        self.monitor = build.build_monitor(cfg, self.dist, model)
        # eval.mode external/none: no evaluators here; `python -m pretrain.evaluate` does the rest.
        self.eval_inline = cfg.eval.mode == "inline"
        self.evaluate = build.build_eval_runner(cfg, self.dist, self.engine.autocast, self.monitor.scalars,
                                                  storage, on_record=self.monitor.eval_record)
        self.step = 0  # optimiser steps taken; everything else is owned by the components
        self.last_save = time.monotonic()  # for checkpoint.every_minutes
        self.profiler = build.build_profiler(cfg, self.dist)  # train.profile: traces of chosen steps
        # Stop flags and their one agreement per step; SIGTERM/SIGUSR1 -> checkpoint, exit for requeue.
        self.faults = build.build_faults(cfg, self.dist, self.loader, self.checkpointer, self.lease, self.monitor)
        interrupt_retries_when(self.faults.preemption.stop_reason)  # a signal ends this process's retry waits
        self.saved_step: int | None = None  # the step of the last checkpoint this run saved
        if cfg.checkpoint.resume == "never" and self.checkpointer.list_steps():
            raise ConfigError(f"{config_source}: checkpoint.resume is 'never' but {self.run_dir} already "
                              "holds checkpoints; choose another run.dir or resume")
        if self.dist.is_main:
            fs, root = fsspec.core.url_to_fs(self.run_dir)
            fs.makedirs(root, exist_ok=True)
            write_atomic(fs, f"{root}/config.yaml", to_yaml(cfg).encode())
        log.info("model %s: %.2fM params | %d ranks x %d images (%d x %d accumulated) | engine %s | device %s"
                 " | run dir %s", cfg.model.name, n_params / 1e6, self.dist.world_size, self.batch_size,
                 self.micro_batch_size, self.accum_steps, self.engine.kind, self.dist.device, self.run_dir)

    def resume(self) -> None:
        # Fault tolerance: a group that live peers are ahead of takes a peer's state instead of a file, unless
        # its own checkpoint is newer still (the peers then fail the step they expected it in, and recover from it).
        peer_step = self.engine.recover_live()
        if peer_step is not None:
            own = torch.tensor([float(max(self.checkpointer.list_steps(), default=0) if self.dist.is_main else 0)])
            broadcast(own)  # rank 0's listing decides for the group, as it does in `restore`
            own = int(own.item())
            if peer_step >= own:
                self.step = peer_step
                log.warning("recovered live from a peer at step %d: no checkpoint read", peer_step)
                return
            log.warning("peers are at step %d, this group's checkpoint at step %d: resuming from it", peer_step, own)
        choice = self.cfg.checkpoint.resume  # auto, or step_N: take that one even if it fails verification
        pick = int(choice.removeprefix("step_")) if choice.startswith("step_") else None
        restored = self.checkpointer.restore(self.engine, pick)  # weights + optimiser, in the engine's own layout
        if restored is None:
            return
        self.engine.load_scheduler_state(restored.shared["scheduler"])
        self.loader.load_state_dict(restored.shared["data"])  # global record: any world layout
        if restored.rank_state is not None:
            restore_rng(restored.rank_state["rng"])
        self.step = restored.step
        log.info("resumed from %s (step %d) with world size %d (saved by %s)", restored.path, self.step,
                 self.dist.world_size, restored.metadata.get("world_size", "?"))

    def save_and_evaluate(self, evaluate: bool = True) -> None:
        t0 = time.perf_counter()
        self.last_save = time.monotonic()
        self.saved_step = self.step
        samples = self.step * self.cfg.train.global_batch_size
        path = self.checkpointer.save(
            self.step, self.engine,
            shared_state={"step": self.step, "samples_seen": samples, "scheduler": self.engine.scheduler_state(),
                          "data": self.loader.state_dict()},  # collective: the same global record on every rank
            rank_state={"rng": capture_rng(), "step": self.step},
            metadata={"engine": self.engine.kind, "model": self.cfg.model.name, "code_version": _code_version(),
                      "samples_seen": samples},
            config_yaml=to_yaml(self.cfg))
        t1 = time.perf_counter()
        log.info("checkpoint %s: training stalled %.2fs%s", path, t1 - t0,
                 " (files written on the checkpoint thread)" if self.cfg.checkpoint.async_save else "")
        if evaluate and self.eval_inline:  # its record is written once the checkpoint is published (async save)
            self.evaluate(self._eval_model(), self.step, path, before_record=self.checkpointer.wait)
        self.monitor.scalars(self.step, {"perf/checkpoint_stall_s": t1 - t0, "perf/eval_s": time.perf_counter() - t1})
        self.monitor.pause(time.perf_counter() - t0)  # keep img/s a training-only figure

    def _eval_model(self) -> torch.nn.Module:
        """The model the evaluators see (collective). Under fsdp / ZeRO-3 the live weights are sharded and
        every forward is a collective, which rank-uneven eval data (and rank-0-only evaluators) would
        deadlock; those engines are evaluated on a plain replica built from the consolidated weights."""
        if not self.engine.shards_weights:
            return self.engine.unwrapped
        state = self.engine.consolidated_state_dict()  # collective; the full weights land on rank 0
        with torch.device("meta"):  # no init: it would also consume RNG draws and break exact resume
            replica = build.build_model(self.cfg, "eval replica")
        replica = replica.to_empty(device=self.dist.device)
        for name, tensor in sorted(replica.state_dict().items()):
            if self.dist.is_main:
                tensor.copy_(state[name])
            broadcast(tensor)
        return replica

    def train(self) -> None:
        cfg = self.cfg
        if cfg.checkpoint.resume != "never":
            self.resume()
        start_step = self.step
        # At the step the run (re)starts from: an elastic restart on fewer nodes shows up as a drop here.
        self.monitor.scalars(self.step, {"dist/world_size": self.dist.world_size})
        if self.step >= cfg.train.steps:
            log.info("nothing to do: %s is already at step %d of %d (raise train.steps, or use a new run.dir)",
                     self.run_dir, self.step, cfg.train.steps)
            return
        batches = iter(self.loader)
        try:
            if self.step == 0 and self.eval_inline and cfg.eval.baseline:
                self.evaluate_baseline()
            self.engine.model.train()
            while self.step < cfg.train.steps:
                with self.profiler.step(self.step + 1):
                    self.train_step(batches)
                if not self.engine.committed:  # torchft dropped the step: no boundary, it is done again
                    continue
                # ---- step boundary: weights, schedule and data position agree on self.step here
                save_due = itstime(self.step, cfg.checkpoint.every_steps, cfg.train.steps) or self.checkpoint_time_due()
                health_due = save_due or itstime(self.step, cfg.train.log_every, cfg.train.steps)
                if stop := self.faults.at_boundary(self.step, health_due):  # the one collective (faults.py)
                    self.stop(stop)
                if save_due:  # never a checkpoint of a run on bad data: judged above
                    self.save_and_evaluate()
        except RetryInterrupted as e:  # an evaluation was waiting on a store that does not answer (a signal came)
            log.warning("%s: evaluation abandoned", e)
            self.stop_for_requeue()
        self.checkpointer.wait()  # the last checkpoint is published before the run says it is done
        for line in self.monitor.summary(self.step, start_step):  # wall time, steps, loss, last eval, where
            log.info("%s", line)

    def evaluate_baseline(self) -> None:
        """The random-init row of the evaluation records (step 0), paused out of img/s."""
        t0 = time.perf_counter()
        self.evaluate(self._eval_model(), 0, "initial weights")
        self.monitor.pause(time.perf_counter() - t0)

    def stop(self, stop: Stop) -> None:
        """The boundary's decision, taken alike on every rank: requeue (checkpoint, exit 75) or raise its line."""
        if stop.requeue:
            self.stop_for_requeue(stop.reason)
        raise stop.error

    def stop_for_requeue(self, reason: str | None = None) -> None:
        """Preempted: checkpoint the last finished step (unless this run just saved it) and exit for a requeue."""
        if self.saved_step != self.step:
            self.save_and_evaluate(evaluate=False)  # the grace period is short: checkpoint only
        self.checkpointer.wait()
        raise Preempted(self.step, reason or self.faults.preemption.reason())

    def train_step(self, batches: Iterator) -> None:
        """One optimiser step: `accum_steps` micro batches, then the update or, for a bad loss, a skip.
        The losses stay on the device and the guard reads them once, after the last forward and before
        the last backward (DeepSpeed updates inside that one): one host sync per step. The earlier
        micro batches' backwards run unjudged where the engine's skip drops every gradient of the step;
        an engine that cannot (`judge_each_micro_batch`) has each micro batch judged before its backward.

        A step whose wait for data a preemption signal ended (`next_batch`) is vetoed in the guard's
        all-reduce and dropped on every rank before any update: weights, schedule, data position and RNG
        stay those of the step boundary before it, which the trainer then saves."""
        self.step = self.engine.begin_step(self.step)  # fault tolerance: the quorum, or a peer's step after recovery
        self.loader.mark()
        rng = capture_rng()
        data_wait, losses, pending, bad = 0.0, [], [], None
        for i in range(self.accum_steps):
            t0 = time.perf_counter()
            batch = self.faults.next_batch(batches, self.step)  # consumed even in a skipped step: stream stays in step
            data_wait += time.perf_counter() - t0
            if bad is not None:
                continue
            images, labels = self.to_device(batch)
            with self.engine.autocast():
                logits = self.engine.model(images)
            loss = self.loss_fn(logits, labels)
            losses.append(loss.detach())
            pending.append(losses[-1])
            if i == self.accum_steps - 1 or self.engine.judge_each_micro_batch:
                bad, pending = self.guard.judge(pending, veto=self.faults.cut_short), []
            if bad is None:
                self.engine.backward(loss)
        if self.guard.vetoed:  # no update, no schedule step: the step never happened
            self.loader.rewind()
            restore_rng(rng)
            self.faults.cut_short = True
            log.warning("step %d dropped: %s; saving step %d", self.step + 1, bad, self.step)
            return
        lr = self.engine.lr  # the rate this update uses; step() advances the schedule
        grad_norm = self.engine.step() if bad is None else self.engine.skip_step()
        if not self.engine.committed:  # a replica group failed during the step: done again, same samples
            self.loader.rewind()
            restore_rng(rng)
            log.warning("step %d not committed (a replica group failed during it): done again", self.step + 1)
            return
        if bad is None:
            engine = self.engine
            self.monitor.step(self.step + 1, torch.stack(losses).mean(), grad_norm, lr, data_wait,
                              loss_scale=lambda: engine.loss_scale)  # read on log steps only (a host sync)
        else:
            self.monitor.skipped_step(self.step + 1)
        self.guard.end_step(self.step + 1, bad)
        self.step += 1

    def checkpoint_time_due(self) -> bool:
        """`checkpoint.every_minutes` of wall time since the last save. Rank 0's clock decides, and
        only on log steps, so ranks agree without one more collective per step."""
        minutes = self.cfg.checkpoint.every_minutes
        if not minutes or not itstime(self.step, self.cfg.train.log_every, self.cfg.train.steps):
            return False
        due = torch.tensor([float(time.monotonic() - self.last_save >= 60 * minutes)])
        broadcast(due)
        return bool(due.item())

    def close(self) -> None:
        # A save still in flight is finished first, also when training stopped on an error that
        # every rank agreed on (divergence, bad data): its checkpoint is the one to resume from.
        try:
            self.checkpointer.wait()
        except Exception as e:  # noqa: BLE001 -- the error that ended the run matters more
            log.error("the checkpoint being written when the run stopped was not saved: %s", e)
        self.monitor.close()
        if getattr(self, "engine", None) is not None:
            self.engine.close()
        interrupt_retries_when(None)
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        shutdown()
