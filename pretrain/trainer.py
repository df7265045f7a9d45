"""The Trainer: builds every component once, then runs a loop that fits on one screen."""
from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import fsspec
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from data_pipeline.errors import DataSpecError
from data_pipeline.stream import SKIP_KINDS

from . import build
from .checkpoint import Checkpointer, capture_rng, restore_rng
from .config import ConfigError, to_yaml
from .dist import all_reduce_sum, init_distributed, shutdown
from .evaluation import EvalRunner
from .monitor import Monitor, itstime

log = logging.getLogger("pretrain")


def _code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Trainer:
    def __init__(self, cfg: DictConfig, config_source: str = "config", local_rank: int | None = None) -> None:
        self.cfg = cfg
        self.dist = init_distributed(cfg.train.device, cfg.engine.backend, local_rank)
        logging.basicConfig(level=logging.INFO if self.dist.is_main else logging.WARNING,
                            format=f"%(asctime)s [rank {self.dist.rank}] %(message)s", datefmt="%H:%M:%S",
                            force=True)
        self.run_dir = cfg.run.dir
        self.batch_size = build.per_device_batch_size(cfg, self.dist, config_source)
        # Same seed on every rank for the weights (DDP also broadcasts rank 0's), then a per-rank
        # seed so that dropout / drop-path masks differ between ranks.
        torch.manual_seed(cfg.train.seed)
        model = build.build_model(cfg, config_source)
        torch.manual_seed(cfg.train.seed + 1000 * (self.dist.rank + 1))
        self.engine = build.build_train_engine(cfg, model, self.dist)
        self.forward = build.build_forward(cfg, self.dist, self.engine)
        build.prepare_data(cfg, self.dist)
        self.loader = build.build_train_loader(cfg, self.dist, self.batch_size)
        self.checkpointer = Checkpointer(self.run_dir, self.dist, keep_last=cfg.checkpoint.keep_last)
        self.monitor = Monitor(self.run_dir, self.dist, cfg.train.steps, cfg.train.log_every,
                               cfg.train.global_batch_size, model.flops_per_image())
        # eval.mode external/none: training only writes checkpoints; `python -m pretrain.evaluate` does the rest.
        self.eval_inline = cfg.eval.mode == "inline"
        evaluators = build.build_evaluators(cfg, self.dist, self.forward) if self.eval_inline else []
        self.evaluate = EvalRunner(evaluators, self.run_dir, self.dist, self.monitor.scalars)
        self.step = 0  # optimiser steps taken; everything else is owned by the components
        if cfg.checkpoint.resume == "never" and self.checkpointer.list_steps():
            raise ConfigError(f"{config_source}: checkpoint.resume is 'never' but {self.run_dir} already "
                              "holds checkpoints; choose another run.dir or resume")
        if self.dist.is_main:
            fs, root = fsspec.core.url_to_fs(self.run_dir)
            fs.makedirs(root, exist_ok=True)
            with fs.open(f"{root}/config.yaml", "w") as f:
                f.write(to_yaml(cfg))
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM params | %d ranks x %d images | engine %s | device %s | run dir %s",
                 cfg.model.name, n_params / 1e6, self.dist.world_size, self.batch_size,
                 self.engine.kind, self.dist.device, self.run_dir)

    def resume(self) -> None:
        loaded = self.checkpointer.load_latest()
        if loaded is None:
            return
        self.engine.unwrapped.load_state_dict(loaded.model)
        self.engine.load_state_dict(loaded.engine)
        restore_rng(loaded.rank_state["rng"])
        self.loader.load_state_dict(loaded.rank_state["data"])
        self.step = loaded.step
        log.info("resumed from %s (step %d)", loaded.path, self.step)

    def save_and_evaluate(self) -> None:
        t0 = time.perf_counter()
        path = self.checkpointer.save(
            self.step, self.engine.unwrapped.state_dict(), self.engine.state_dict(),
            rank_state={"rng": capture_rng(), "data": self.loader.state_dict(), "step": self.step},
            extra_metadata={"engine": self.engine.kind, "model": self.cfg.model.name, "code_version": _code_version(),
                            "samples_seen": self.step * self.cfg.train.global_batch_size},
            config_yaml=to_yaml(self.cfg))
        t1 = time.perf_counter()
        log.info("checkpoint %s (%.1fs)", path, t1 - t0)
        if self.eval_inline:
            self.evaluate(self.engine.unwrapped, self.step, path)
        self.monitor.scalars(self.step, {"perf/checkpoint_s": t1 - t0, "perf/eval_s": time.perf_counter() - t1})
        self.monitor.pause(time.perf_counter() - t0)  # keep img/s a training-only figure

    def check_data_health(self) -> None:
        """Collective: report skipped samples, and stop if too large a fraction of the data is bad."""
        skipped = self.loader.skipped
        counts = all_reduce_sum(torch.tensor([skipped[k] for k in SKIP_KINDS] + [self.loader.delivered],
                                             dtype=torch.float64)).tolist()
        bad, delivered = sum(counts[:-1]), counts[-1]
        if bad:
            self.monitor.scalars(self.step, {f"data/skipped_{k}": v for k, v in zip(SKIP_KINDS, counts)})
        fraction = bad / max(1.0, bad + delivered)
        if fraction > self.cfg.data.max_skip_fraction:
            raise DataSpecError(f"{fraction:.1%} of the samples read so far were skipped as unusable "
                                f"({', '.join(f'{k} {int(v)}' for k, v in zip(SKIP_KINDS, counts) if v)}), above "
                                f"data.max_skip_fraction={self.cfg.data.max_skip_fraction}; see the warnings above")

    def train(self) -> None:
        cfg = self.cfg
        if cfg.checkpoint.resume == "auto":
            self.resume()
        if self.step >= cfg.train.steps:
            log.info("nothing to do: %s is already at step %d of %d (raise train.steps, or use a new run.dir)",
                     self.run_dir, self.step, cfg.train.steps)
            return
        if self.step == 0 and self.eval_inline and cfg.eval.baseline:
            t0 = time.perf_counter()
            self.evaluate(self.engine.unwrapped, 0, "initial weights")  # the random-init baseline row
            self.monitor.pause(time.perf_counter() - t0)
        batches = iter(self.loader)
        self.engine.model.train()
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            batch = next(batches)
            data_wait = time.perf_counter() - t0
            images, labels = self.forward.prepare(batch)
            with self.engine.autocast():
                logits = self.engine.model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.optim.label_smoothing)
            self.engine.backward(loss)
            lr = self.engine.lr  # the rate this update uses; step() advances the schedule
            grad_norm = self.engine.step()
            self.step += 1
            self.monitor.step(self.step, loss, grad_norm, lr, data_wait)
            if itstime(self.step, cfg.train.log_every, cfg.train.steps):
                self.check_data_health()
            if itstime(self.step, cfg.checkpoint.every_steps, cfg.train.steps):
                self.save_and_evaluate()
        log.info("done: %d steps, run dir %s", self.step, self.run_dir)

    def close(self) -> None:
        self.monitor.close()
        shutdown()
