"""`main.py --dry-run`: the run of a command line built as training builds it (config, data checks, model,
data loader, engine, loss, evaluators) and one optimiser step taken on one batch, with nothing written:
no run dir, lease, checkpoint, config.yaml, TensorBoard or W&B files, and no demo data. It ends with the
memory estimate next to the peak this step measured.

What the step measures is the part of the estimate that one step exercises: the model states and
activations (on a GPU: `torch.cuda.max_memory_allocated`; on a CPU: this process's peak resident memory,
whose runtime share is in the estimate too). Data-loader workers are processes of their own and a
checkpoint's host copies are never made, so those parts of the host estimate are listed, not measured.
"""
from __future__ import annotations

import logging
import time

import torch
from omegaconf import DictConfig

from data_pipeline.errors import DataSpecError

from . import build
from .config import ConfigError
from .dist import init_distributed, shutdown
from .memory import GIB, RUNTIME_BYTES
from .monitor import max_rss_gib

log = logging.getLogger("pretrain")


def dry_run(cfg: DictConfig, where: str = "config", local_rank: int | None = None) -> list[str]:
    """Build the run of `cfg`, take one step, write nothing; the report's lines (rank 0's; others get [])."""
    info = init_distributed(cfg.train.device, cfg.engine.backend, local_rank)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {info.rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    try:
        return _dry_run(cfg, where, info)
    finally:
        shutdown()


def _dry_run(cfg: DictConfig, where: str, info) -> list[str]:
    t0 = time.perf_counter()
    cfg = build.resolve_precision(cfg, info.device, where, announce=info.is_main)
    micro, accum = build.batch_layout(cfg, info, where)
    build.check_model_config(cfg, where)
    storage = build.build_storage(cfg)
    try:
        build.check_data(cfg, storage, where)
    except DataSpecError as e:
        if cfg.data.prepare != "demo":
            raise
        raise ConfigError(f"{where}: data.prepare is demo but the demo data under {cfg.data.root} is not there yet "
                          f"({e}); a dry run writes nothing: run once without --dry-run to generate it") from None
    cfg = build.resolve_num_classes(cfg, storage, where)
    line, estimate = build.memory_estimate(cfg, info.world_size, where, device_type=info.device.type, rank=info.rank)
    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(info.device)
    torch.manual_seed(cfg.train.seed)
    model = build.build_model(cfg, where)
    loader = build.build_train_loader(cfg, info, micro, storage)
    engine = build.build_train_engine(cfg, model, info, where)
    loss_fn = build.build_train_loss(cfg)
    to_device = build.build_batch_to_device(cfg, info)
    # Built, not run: an evaluator's data or settings that are wrong fail here, as they would at start.
    build.build_eval_runner(cfg, info, engine.autocast, lambda step, values: None, storage)
    batches = iter(loader)
    t1 = time.perf_counter()
    engine.model.train()
    for _ in range(accum):  # one optimiser step: every micro batch of it, as training takes them
        images, labels = to_device(next(batches))
        with engine.autocast():
            loss = loss_fn(engine.model(images), labels)
        engine.backward(loss)
    engine.step()
    if cuda:
        torch.cuda.synchronize(info.device)
    step_s = time.perf_counter() - t1
    del batches
    if not info.is_main:
        return []
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    if cuda:
        measured = torch.cuda.max_memory_allocated(info.device)
        versus = f"estimate {g(estimate.total)} per device, measured peak {g(measured)} (max_memory_allocated)"
    else:
        measured = int(max_rss_gib() * GIB)
        expected = estimate.total + RUNTIME_BYTES
        versus = (f"estimate {g(expected)} (model states and activations {g(estimate.total)} + runtime "
                  f"{g(RUNTIME_BYTES)}), measured peak {g(measured)} (this process's peak RSS); not exercised "
                  f"by one step: data workers {g(estimate.workers)}, checkpoint copies {g(estimate.checkpoint)}")
    return [f"memory estimate: {line}",
            f"dry run: built in {t1 - t0:.1f}s; one step of {info.world_size} x {micro} x {accum} images in "
            f"{step_s:.2f}s (its data loading included), loss {float(loss.detach()):.4f}; nothing was written",
            f"memory: {versus} ({measured / max(1, estimate.total + (0 if cuda else RUNTIME_BYTES)):.0%} of "
            "the estimate)"]
