"""Evaluate a run's checkpoints outside the training job: on another machine, in a SLURM job, or
from a watcher that follows a run as it trains.

  python -m pretrain.evaluate RUN_DIR --step 2000      # one checkpoint (0: the initial weights)
  python -m pretrain.evaluate RUN_DIR --watch          # every new checkpoint, once, until the last
  python -m pretrain.evaluate RUN_DIR --summary        # table of all records + one PNG per metric
  python -m pretrain.evaluate s3://bucket/runs/b16 --watch data.root=/mnt/data   # other machine

It reads the checkpoint's weights through the checkpoint reader (model.safetensors, checked against
its sha256 and the format version, as a resume does) and the run's config.yaml through fsspec, builds
the evaluators from that config (`key=value` arguments override it, e.g. data paths that differ on
this machine), and records the results exactly like inline evaluation does:
`<RUN_DIR>/eval/step_XXXXXXX.json`, `results.jsonl`, TensorBoard scalars in `<RUN_DIR>/tb` (through the
Monitor's writer, so they reach object storage too). A step that already has a record is never
evaluated again (`--force` does), and a watcher claims a step before evaluating it, so two
watchers, or a watcher restarted after a crash, never duplicate one. Set `eval.mode: external` in
the training config to leave evaluation to this command.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import tempfile
import time
from typing import Sequence

import fsspec
import torch
from omegaconf import DictConfig

log = logging.getLogger("pretrain.evaluate")
STALE_CLAIM_S = 6 * 3600.0  # a claim this old is taken over even if its owner may be alive elsewhere


class EvaluateError(RuntimeError):
    """A run directory or checkpoint that cannot be evaluated; one line."""


def _load_config(url: str, overrides: Sequence[str]) -> DictConfig:
    """A run's or checkpoint's config.yaml (any fsspec URL), validated like a training config."""
    from .config import ConfigError, load_config, upgrade_saved_config

    try:
        with fsspec.open(url, "r") as f:
            text = upgrade_saved_config(f.read())  # a run trained before a key moved
    except FileNotFoundError:
        raise EvaluateError(f"{url}: not found (is this a run directory written by pretrain/main.py?)") from None
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name, list(overrides))
    except ConfigError as e:
        raise ConfigError(str(e).replace(f.name, url)) from None
    finally:
        os.unlink(f.name)


class CheckpointEvaluation:
    """Builds the model and evaluators once (from the run's config), then evaluates steps."""

    def __init__(self, run_dir: str, overrides: Sequence[str] = ()) -> None:
        from . import build
        from .checkpoint import CheckpointReader
        from .dist import DistInfo, local_device
        from .engines.base import precision_autocast
        from .evaluation import EvalRecords
        from .monitor import ScalarWriter

        self.run_dir = run_dir.rstrip("/")
        # run.dir: where the run is now (it may have been copied or moved since it trained).
        self.cfg = _load_config(f"{self.run_dir}/config.yaml", [*overrides, f"run.dir={self.run_dir}"])
        # Evaluated wherever it is started: a run trained on cuda is evaluated on the CPU of a machine without one.
        device = local_device("cpu" if self.cfg.train.device == "cpu" else "auto")
        self.dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
        self.cfg = build.resolve_precision(self.cfg, device, f"{self.run_dir}/config.yaml", announce=False)
        self.records = EvalRecords(self.run_dir)
        self.checkpoints = CheckpointReader(self.run_dir)
        # Evaluations are minutes apart: each one's scalars go up to object storage at once.
        self.writer = ScalarWriter(self.run_dir, upload_every_s=0.0)
        autocast = functools.partial(precision_autocast, device, self.cfg.train.precision)
        make_wandb = build.wandb_factory(self.cfg, job="eval")  # monitor.wandb: a W&B run in the training's group
        self.wandb = make_wandb() if make_wandb else None
        self.runner = build.build_eval_runner(self.cfg, self.dist, autocast, self._scalars,
                                              build.build_storage(self.cfg), in_training=False,
                                              on_record=self.wandb.record if self.wandb else None)
        self._build_model = lambda: build.build_model(self.cfg, f"{self.run_dir}/config.yaml")

    def _scalars(self, step: int, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.write(step, values)
        try:
            self.writer.write(step, values)
        except OSError as e:  # storage the event files cannot reach: the JSON records are still written
            log.warning("TensorBoard scalars of step %d not written to %s/tb: %s", step, self.run_dir, e)

    def load_model(self, step: int) -> tuple[torch.nn.Module, str]:
        """Step 0: the initial weights, rebuilt from the seed exactly as the trainer builds them."""
        if step == 0:
            torch.manual_seed(self.cfg.train.seed)
            return self._build_model(), "initial weights"
        weights = self.checkpoints.read_weights(step)  # verified, of this format; safetensors: no pickled code
        model = self._build_model()
        model.load_state_dict(weights)
        return model, self.checkpoints.url(self.checkpoints.step_path(step))

    def evaluate(self, step: int) -> dict:
        from .checkpoint import CheckpointError

        try:
            model, source = self.load_model(step)
        except CheckpointError as e:
            # Recorded, so that a watcher does not retry a checkpoint that will never load.
            record = {"step": step, "checkpoint": None, "results": {}, "errors": {"checkpoint": str(e)}}
            log.error("%s", e)
            self.records.write(record)
            return record
        return self.runner(model.to(self.dist.device), step, source)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.close()
        try:
            self.writer.close()
        except OSError as e:
            log.warning("TensorBoard scalars not written to %s/tb: %s", self.run_dir, e)


def watch(ev: CheckpointEvaluation, poll_s: float, once: bool, stale_after_s: float = STALE_CLAIM_S) -> int:
    """Evaluate every checkpoint that has no record yet, claiming each first; stop after the run's
    last step is recorded (or after one pass with `once`). Returns how many steps it evaluated."""
    done = 0
    final = ev.cfg.train.steps
    while True:
        steps = ([0] if ev.cfg.eval.baseline else []) + ev.checkpoints.list_steps()
        for step in steps:
            if ev.records.has(step) or not ev.records.claim(step, stale_after_s):
                continue
            try:
                if not ev.records.has(step):  # another watcher may have finished it just before our claim
                    log.info("evaluating step %d", step)
                    ev.evaluate(step)
                    done += 1
            finally:
                ev.records.release(step)
        if once or ev.records.has(final):
            return done
        time.sleep(poll_s)


def summary(run_dir: str, plots: bool = True) -> str:
    """Table of a run's records (one row per step, one column per task/metric); PNG plots of each
    metric against step under `<run_dir>/eval/plots/` when matplotlib is installed."""
    from .evaluation import EvalRecords
    from .evaluation.summary import plot_metrics, records_table

    records = list(EvalRecords(run_dir).all())
    if not records:
        raise EvaluateError(f"{run_dir}: no evaluation records under eval/ yet")
    text = records_table(records)
    if plots:
        try:
            written = plot_metrics(records, f"{run_dir.rstrip('/')}/eval/plots")
            text += f"\n{len(written)} plots in {run_dir.rstrip('/')}/eval/plots/"
        except ImportError:
            text += "\n(no plots: matplotlib is not installed; pip install matplotlib)"
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run directory (run.dir of the training config; any fsspec URL)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--step", type=int, help="evaluate this checkpoint (0: the initial weights) and record it")
    what.add_argument("--watch", action="store_true", help="evaluate each new checkpoint once, until the last")
    what.add_argument("--summary", action="store_true", help="print the table of records and write plots")
    p.add_argument("--force", action="store_true", help="with --step: evaluate again even if recorded")
    p.add_argument("--poll", type=float, default=30.0, help="with --watch: seconds between looks (default 30)")
    p.add_argument("--once", action="store_true", help="with --watch: one pass over what exists, then exit")
    p.add_argument("--no-plots", action="store_true", help="with --summary: the table only")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override the run's config (e.g. data paths)")
    return p.parse_intermixed_args(argv)  # overrides may come after the options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [eval] %(message)s", datefmt="%H:%M:%S")
    from data_pipeline.errors import DataSpecError, first_line

    from .config import ConfigError

    # SIGTERM (scancel, kill) unwinds like Ctrl-C, so a watcher's claim is released on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ev = None
    try:
        if args.summary:
            print(summary(args.run_dir, plots=not args.no_plots))
            return 0
        ev = CheckpointEvaluation(args.run_dir, args.overrides)
        if args.watch:
            n = watch(ev, args.poll, args.once)
            log.info("watcher done: %d checkpoint(s) evaluated", n)
            return 0
        if args.force:
            return 1 if ev.evaluate(args.step)["errors"] else 0
        if ev.records.has(args.step):
            log.info("step %d of %s is already evaluated (--force to redo it)", args.step, args.run_dir)
            return 0
        if not ev.records.claim(args.step, STALE_CLAIM_S):  # a watcher or another job has it
            log.info("step %d of %s is being evaluated by another process", args.step, args.run_dir)
            return 0
        try:
            return 1 if ev.evaluate(args.step)["errors"] else 0
        finally:
            ev.records.release(args.step)
    except (ConfigError, DataSpecError, EvaluateError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if ev is not None:
            ev.close()


if __name__ == "__main__":
    sys.exit(main())
