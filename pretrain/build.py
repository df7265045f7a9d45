"""The one place where the config tree becomes objects: model, data streams, engine, evaluators."""
from __future__ import annotations

import logging
from functools import partial

import torch
from omegaconf import DictConfig
from torch import nn

from data_pipeline.augment import MixupCutmix, RandAugment
from data_pipeline.demo import ensure_demo_data
from data_pipeline.device import normalize
from data_pipeline.gpu_decode import CropPlanner, decode_batch, gpu_decode_available
from data_pipeline.storage import StorageOptions
from data_pipeline.stream import Batch, DataSource, TrainLoader, eval_batches
from data_pipeline.transforms import EvalTransform, TrainTransform

from .config import ConfigError
from .dist import DistInfo, barrier
from .engine import Engine, build_engine
from .evaluation import Evaluator, FewShotEvaluator, Forward, UpstreamEvaluator
from .models import apply_mlp_impl, create_model
from .optim import build_optimizer, build_scheduler

log = logging.getLogger("pretrain")


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
    return apply_mlp_impl(model, cfg.model.mlp_impl)


def build_train_engine(cfg: DictConfig, model: nn.Module, dist_info: DistInfo) -> Engine:
    o = cfg.optim
    return build_engine(
        cfg.engine.kind, model, dist_info,
        optimizer_factory=partial(build_optimizer, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay),
        scheduler_factory=partial(build_scheduler, total_steps=cfg.train.steps,
                                  warmup_steps=o.warmup_steps, schedule=o.schedule, end_ratio=o.end_lr_ratio),
        precision=cfg.train.precision, grad_clip=o.grad_clip)


def build_storage(cfg: DictConfig) -> StorageOptions:
    st = cfg.data.storage
    return StorageOptions(s3_endpoint=st.s3_endpoint, s3_profile=st.s3_profile, s3_anon=st.s3_anon,
                          retries=st.retries, backoff_s=st.backoff_s)


def build_train_loader(cfg: DictConfig, dist_info: DistInfo, batch_size: int) -> TrainLoader:
    d = cfg.data
    a = d.augment
    randaugment = RandAugment(a.randaugment_ops, a.randaugment_magnitude) if a.randaugment_ops else None
    transform = TrainTransform(d.image_size, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
                               randaugment=randaugment)
    if d.decode == "gpu":
        why_not = gpu_decode_available(dist_info.device)
        if why_not:
            log.warning("data.decode is 'gpu' but %s: decoding on the CPU workers instead", why_not)
        else:
            transform = CropPlanner(transform)  # workers read headers and draw crops; pixels come later
    sources = [DataSource(s.train, s.weight, s.name) for s in d.sources] or d.train
    return TrainLoader(sources, batch_size=batch_size, transform=transform, seed=cfg.train.seed,
                       rank=dist_info.rank, world_size=dist_info.world_size, num_workers=d.num_workers,
                       shuffle_buffer=d.shuffle_buffer, pin_memory=dist_info.device.type == "cuda",
                       epoch_mode=d.epoch_mode, storage=build_storage(cfg))


def _prepare(cfg: DictConfig, device: torch.device, mix: MixupCutmix | None):
    mean, std = list(cfg.data.mean), list(cfg.data.std)

    def prepare(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        keys, labels = batch.keys, batch.labels
        if batch.encoded is not None:  # data.decode gpu: JPEG bytes in, decoded + cropped on the device
            images, keep = decode_batch(batch.encoded, batch.crops, cfg.data.image_size, device)
            labels, keys = labels[keep], [k for k, ok in zip(keys, keep.tolist()) if ok]
        else:
            # uint8 crosses the bus (4x fewer bytes than float32); normalisation runs on the device.
            images = batch.images.to(device, non_blocking=True)
        images, labels = normalize(images, mean, std), labels.to(device, non_blocking=True)
        if mix is not None and mix.enabled:  # soft targets [B, num_classes]; F.cross_entropy takes them as is
            images, labels = mix(images, labels, keys)
        return images, labels

    return prepare


def build_forward(cfg: DictConfig, dist_info: DistInfo, engine: Engine) -> Forward:
    a = cfg.data.augment
    mix = MixupCutmix(cfg.model.num_classes, a.mixup_alpha, a.cutmix_alpha, a.mix_prob, a.mix_switch_prob,
                      seed=cfg.train.seed)
    return Forward(prepare=_prepare(cfg, dist_info.device, mix), autocast=engine.autocast)


def build_evaluators(cfg: DictConfig, dist_info: DistInfo, forward: Forward) -> list[Evaluator]:
    e, d = cfg.eval, cfg.data
    forward = Forward(prepare=_prepare(cfg, dist_info.device, None), autocast=forward.autocast)  # never mixed
    transform = EvalTransform(d.image_size, crop_fraction=d.crop_fraction)
    batches = partial(eval_batches, batch_size=e.batch_size, transform=transform, num_workers=0,
                      storage=build_storage(cfg))
    evaluators: list[Evaluator] = []
    if e.upstream.enabled and d.val:
        evaluators.append(UpstreamEvaluator(
            partial(batches, d.val, rank=dist_info.rank, world_size=dist_info.world_size),
            cfg.model.num_classes, forward, dist_info.device))
    if e.fewshot.enabled:
        evaluators.append(FewShotEvaluator(
            partial(batches, e.fewshot.train), partial(batches, e.fewshot.test), forward,
            shots=e.fewshot.shots, seeds=e.fewshot.seeds, l2_regs=e.fewshot.l2_regs, dist_info=dist_info))
    return evaluators
