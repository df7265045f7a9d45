"""Evaluate a run's checkpoints outside the training job: on another machine, in a SLURM job, or
from a watcher that follows a run as it trains.

  python -m pretrain.evaluate RUN_DIR --step 2000      # one checkpoint (0: the initial weights)
  python -m pretrain.evaluate RUN_DIR --watch          # every new checkpoint, once, until the last
  python -m pretrain.evaluate RUN_DIR --summary        # table of all records + one PNG per metric
  python -m pretrain.evaluate s3://bucket/runs/b16 --watch data.root=/mnt/data   # other machine

It reads what the checkpoint holds (model.safetensors, checked against its sha256, and
config.yaml) through fsspec, builds the evaluators from that config (`key=value` arguments
override it, e.g. data paths that differ on this machine), and records the results exactly like
inline evaluation does: `<RUN_DIR>/eval/step_XXXXXXX.json`, `results.jsonl`, TensorBoard scalars
in `<RUN_DIR>/tb`. A step that already has a record is never evaluated again (`--force` does),
and a watcher claims a step before evaluating it, so two watchers, or a watcher restarted after
a crash, never duplicate one. Set `eval.mode: external` in the training config to leave
evaluation to this command.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
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
    from .config import ConfigError, load_config

    try:
        with fsspec.open(url, "r") as f:
            text = f.read()
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
        from .dist import DistInfo
        from .evaluation import EvalRecords, EvalRunner

        self.run_dir = run_dir.rstrip("/")
        self.cfg = _load_config(f"{self.run_dir}/config.yaml", overrides)
        use_cuda = torch.cuda.is_available() and self.cfg.train.device != "cpu"
        device = torch.device("cuda" if use_cuda else "cpu")
        self.dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
        self.records = EvalRecords(self.run_dir)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.precision)

        def autocast():
            return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

        self.writer = None
        self.runner = EvalRunner(build.build_evaluators(self.cfg, self.dist, autocast), self.run_dir, self.dist,
                                 self._scalars)
        self._build_model = lambda: build.build_model(self.cfg, f"{self.run_dir}/config.yaml")

    def _scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            try:
                self.writer = SummaryWriter(log_dir=f"{self.run_dir}/tb")
            except Exception as e:  # e.g. a storage TensorBoard cannot write to: the JSON records still are
                log.warning("no TensorBoard scalars for %s: %s", self.run_dir, e)
                self.writer = False
        if not self.writer:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def checkpoint_steps(self) -> list[int]:
        fs, root = fsspec.core.url_to_fs(f"{self.run_dir}/checkpoints")
        if not fs.exists(root):
            return []
        from .checkpoint import STEP_DIR
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        return sorted(int(m.group(1)) for m in map(STEP_DIR.match, names) if m)

    def load_model(self, step: int) -> tuple[torch.nn.Module, str]:
        """Step 0: the initial weights, rebuilt from the seed exactly as the trainer builds them."""
        if step == 0:
            torch.manual_seed(self.cfg.train.seed)
            return self._build_model(), "initial weights"
        from safetensors.torch import load as st_load

        path = f"{self.run_dir}/checkpoints/step_{step:07d}"
        fs, root = fsspec.core.url_to_fs(path)
        try:
            meta = json.loads(fs.cat_file(f"{root}/metadata.json"))
            blob = fs.cat_file(f"{root}/model.safetensors")
        except FileNotFoundError:
            raise EvaluateError(
                f"{path}: no such checkpoint (never written, or purged by checkpoint.keep_last)") from None
        except json.JSONDecodeError:
            raise EvaluateError(f"{path}/metadata.json: not valid JSON") from None
        if hashlib.sha256(blob).hexdigest() != meta.get("files", {}).get("model.safetensors"):
            raise EvaluateError(f"{path}/model.safetensors: checksum mismatch (corrupt or partly written)")
        model = self._build_model()
        model.load_state_dict(st_load(blob))  # safetensors: tensors only, no pickled code
        return model, path

    def evaluate(self, step: int) -> dict:
        try:
            model, source = self.load_model(step)
        except EvaluateError as e:
            # Recorded, so that a watcher does not retry a checkpoint that will never load.
            record = {"step": step, "checkpoint": None, "results": {}, "errors": {"checkpoint": str(e)}}
            log.error("%s", e)
            self.records.write(record)
            return record
        return self.runner(model.to(self.dist.device), step, source)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def watch(ev: CheckpointEvaluation, poll_s: float, once: bool, stale_after_s: float = STALE_CLAIM_S) -> int:
    """Evaluate every checkpoint that has no record yet, claiming each first; stop after the run's
    last step is recorded (or after one pass with `once`). Returns how many steps it evaluated."""
    done = 0
    final = ev.cfg.train.steps
    while True:
        steps = ([0] if ev.cfg.eval.baseline else []) + ev.checkpoint_steps()
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
