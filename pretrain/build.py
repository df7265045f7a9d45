"""The one place where the config tree becomes objects: model, data streams, engine, evaluators."""
from __future__ import annotations

from functools import partial

import torch
from omegaconf import DictConfig
from torch import nn

from data_pipeline.demo import ensure_demo_data
from data_pipeline.device import normalize
from data_pipeline.stream import Batch, TrainLoader, eval_batches
from data_pipeline.transforms import EvalTransform, TrainTransform

from .config import ConfigError
from .dist import DistInfo, barrier
from .engine import Engine, build_engine
from .evaluation import (Evaluator, FeatureCache, FewShotEvaluator, FineTuneEvaluator, Forward,
                         LinearProbeEvaluator, UpstreamEvaluator)
from .models import create_model
from .optim import build_optimizer, build_scheduler


def per_device_batch_size(cfg: DictConfig, dist_info: DistInfo, where: str) -> int:
    global_batch = cfg.train.global_batch_size
    if global_batch % dist_info.world_size:
        raise ConfigError(f"{where}: 'train.global_batch_size' {global_batch} is not divisible by the "
                          f"world size {dist_info.world_size}")
    return global_batch // dist_info.world_size


def prepare_data(cfg: DictConfig, dist_info: DistInfo) -> None:
    """Generate the demo data on first use (rank 0 writes, the others wait for it)."""
    if cfg.data.prepare == "demo":
        if dist_info.is_main:
            ensure_demo_data(cfg.data.root, image_size=cfg.data.image_size, seed=cfg.train.seed)
        barrier()


def build_model(cfg: DictConfig, where: str = "config") -> nn.Module:
    overrides = {"drop_rate": cfg.model.drop_rate, "drop_path_rate": cfg.model.drop_path_rate}
    if cfg.model.img_size is not None:
        overrides["img_size"] = cfg.model.img_size
    try:
        model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: model: {e}") from None
    size = cfg.data.image_size
    if tuple(model.stem.img_size) != (size, size):
        raise ConfigError(f"{where}: 'data.image_size' is {size} but {cfg.model.name} takes "
                          f"{model.stem.img_size[0]} px; set model.img_size={size} or data.image_size")
    return model


def build_train_engine(cfg: DictConfig, model: nn.Module, dist_info: DistInfo) -> Engine:
    o = cfg.optim
    return build_engine(
        cfg.engine.kind, model, dist_info,
        optimizer_factory=partial(build_optimizer, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay),
        scheduler_factory=partial(build_scheduler, total_steps=cfg.train.steps,
                                  warmup_steps=o.warmup_steps, schedule=o.schedule, end_ratio=o.end_lr_ratio),
        precision=cfg.train.precision, grad_clip=o.grad_clip)


def build_train_loader(cfg: DictConfig, dist_info: DistInfo, batch_size: int) -> TrainLoader:
    d = cfg.data
    transform = TrainTransform(d.image_size, scale=tuple(d.augment.scale), ratio=tuple(d.augment.ratio),
                               hflip=d.augment.hflip)
    return TrainLoader(d.train, batch_size=batch_size, transform=transform, seed=cfg.train.seed,
                       rank=dist_info.rank, world_size=dist_info.world_size, num_workers=d.num_workers,
                       shuffle_buffer=d.shuffle_buffer, pin_memory=dist_info.device.type == "cuda")


def build_forward(cfg: DictConfig, dist_info: DistInfo, engine: Engine) -> Forward:
    mean, std, device = list(cfg.data.mean), list(cfg.data.std), dist_info.device

    def prepare(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # uint8 crosses the bus (4x fewer bytes than float32); normalisation runs on the device.
        images = batch.images.to(device, non_blocking=True)
        return normalize(images, mean, std), batch.labels.to(device, non_blocking=True)

    return Forward(prepare=prepare, autocast=engine.autocast)


def build_evaluators(cfg: DictConfig, dist_info: DistInfo, forward: Forward) -> list[Evaluator]:
    e, d = cfg.eval, cfg.data
    transform = EvalTransform(d.image_size, crop_fraction=d.crop_fraction)
    batches = partial(eval_batches, batch_size=e.batch_size, transform=transform, num_workers=0)
    # Each rank reads its share of the shards: upstream metrics and downstream features are data-parallel.
    shared = partial(batches, rank=dist_info.rank, world_size=dist_info.world_size)
    features = FeatureCache()  # few-shot and linear probe on the same split share one forward pass
    evaluators: list[Evaluator] = []
    if e.upstream.enabled and d.val:
        evaluators.append(UpstreamEvaluator(
            partial(batches, d.val, rank=dist_info.rank, world_size=dist_info.world_size),
            cfg.model.num_classes, forward, dist_info.device))
    if e.fewshot.enabled:
        evaluators.append(FewShotEvaluator(
            partial(shared, e.fewshot.train), partial(shared, e.fewshot.test), forward,
            shots=e.fewshot.shots, seeds=e.fewshot.seeds, l2_regs=e.fewshot.l2_regs, dist_info=dist_info,
            cache=features, keys=(e.fewshot.train, e.fewshot.test)))
    if e.linear_probe.enabled:
        evaluators.append(LinearProbeEvaluator(
            partial(shared, e.linear_probe.train), partial(shared, e.linear_probe.test), forward,
            l2_regs=e.linear_probe.l2_regs, dist_info=dist_info, cache=features,
            keys=(e.linear_probe.train, e.linear_probe.test)))
    if e.finetune.enabled:
        f = e.finetune
        # Rank 0 fine-tunes alone, so it reads whole splits.
        evaluators.append(FineTuneEvaluator(
            partial(batches, f.train), partial(batches, f.test), forward,
            num_classes=f.num_classes or _manifest_classes(f.train, "eval.finetune.train"), steps=f.steps,
            batch_size=f.batch_size, lr=f.lr, warmup_steps=f.warmup_steps, hflip=f.hflip, dist_info=dist_info,
            seed=cfg.train.seed, time_budget_s=f.time_budget_s))
    return evaluators


def _manifest_classes(spec: str, key: str) -> int:
    from data_pipeline.shards import read_manifest

    if not spec.endswith(".json"):
        raise ConfigError(f"'{key}' {spec!r} is not a manifest; set 'eval.finetune.num_classes'")
    manifest = read_manifest(spec)
    if not manifest.get("num_classes"):
        raise ConfigError(f"{spec}: the manifest gives no num_classes; set 'eval.finetune.num_classes'")
    return int(manifest["num_classes"])
