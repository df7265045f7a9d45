"""The one place where the config tree becomes objects: model, data streams, engine, evaluators."""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from data_pipeline.augment import MixupCutmix, RandAugment
from data_pipeline.demo import ensure_demo_data
from data_pipeline.device import normalize
from data_pipeline.errors import DataSpecError
from data_pipeline.gpu_decode import CropPlanner, decode_batch, gpu_decode_available
from data_pipeline.storage import Storage
from data_pipeline.stream import Batch, DataSource, TrainLoader, eval_batches
from data_pipeline.transforms import EvalTransform, TrainTransform

from .checkpoint import Checkpointer
from .config import ConfigError
from .dist import DistInfo, barrier, node_leaders
from .engines import Engine, build_engine, effective_kind
from .evaluation import (EvalRunner, Evaluator, FeatureCache, FewShotEvaluator, FineTuneEvaluator, Forward,
                         LinearProbeEvaluator, UpstreamEvaluator)
from .loss import build_loss
from .loss_guard import LossGuard
from .memory import MemoryEstimate, estimate_memory
from .models import apply_mlp_impl, create_model
from .monitor import Monitor
from .optim import build_optimizer, build_scheduler
from .preemption import PreemptionWatcher

log = logging.getLogger("pretrain")


def batch_layout(cfg: DictConfig, dist_info: DistInfo, where: str) -> tuple[int, int]:
    """(micro batch per rank, micro batches per step) with micro x accum x world = global batch.
    The global batch (and so the lr) is given once; whichever of the two is not given is derived."""
    g, world = cfg.train.global_batch_size, dist_info.world_size
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    if micro is None:
        accum = accum or 1
        if g % (world * accum):
            raise ConfigError(f"{where}: 'train.global_batch_size' {g} is not divisible by world size {world} x "
                              f"'train.grad_accum_steps' {accum}")
        return g // (world * accum), accum
    if accum is None:
        if g % (world * micro):
            raise ConfigError(f"{where}: 'train.global_batch_size' {g} is not divisible by world size {world} x "
                              f"'train.micro_batch_size' {micro}")
        return micro, g // (world * micro)
    if micro * accum * world != g:
        raise ConfigError(f"{where}: 'train.micro_batch_size' {micro} x 'train.grad_accum_steps' {accum} x world "
                          f"size {world} = {micro * accum * world}, not 'train.global_batch_size' {g}")
    return micro, accum


def prepare_data(cfg: DictConfig, dist_info: DistInfo) -> None:
    """Generate the demo data on first use, once per node (local rank 0 writes, the others wait): a
    node-local data.root is filled on every node. The nodes take turns, so on a shared file system
    the first one writes and the others find it done."""
    if cfg.data.prepare == "demo":
        for leader in node_leaders(dist_info):
            if dist_info.rank == leader:
                ensure_demo_data(cfg.data.root, build_storage(cfg), image_size=cfg.data.image_size, seed=cfg.train.seed)
            barrier()


def build_model(cfg: DictConfig, where: str = "config") -> nn.Module:
    overrides = {"drop_rate": cfg.model.drop_rate, "drop_path_rate": cfg.model.drop_path_rate}
    if cfg.model.img_size is not None:
        overrides["img_size"] = cfg.model.img_size
    if cfg.model.act is not None:
        overrides["act"] = cfg.model.act  # the model names the valid ones (gelu, gelu_tanh for Mixer)
    try:
        model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: model: {e}") from None
    size = cfg.data.image_size
    if tuple(model.stem.img_size) != (size, size):
        raise ConfigError(f"{where}: 'data.image_size' is {size} but {cfg.model.name} takes "
                          f"{model.stem.img_size[0]} px; set model.img_size={size} or data.image_size")
    return apply_mlp_impl(model, cfg.model.mlp_impl)


def build_train_engine(cfg: DictConfig, model: nn.Module, dist_info: DistInfo, where: str = "config") -> Engine:
    o, e = cfg.optim, cfg.engine
    micro, accum = batch_layout(cfg, dist_info, where)
    if e.kind == "deepspeed" and cfg.train.precision == "fp16" and dist_info.device.type == "cpu":
        raise ConfigError(f"{where}: 'train.precision' fp16 with engine.kind=deepspeed needs a GPU (DeepSpeed's "
                          "CPU accelerator has no fp16); use bf16 or fp32 on CPU")
    return build_engine(
        cfg.engine.kind, model, dist_info,
        optimizer_factory=partial(build_optimizer, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay),
        scheduler_factory=partial(build_scheduler, total_steps=cfg.train.steps,
                                  warmup_steps=o.warmup_steps, schedule=o.schedule, end_ratio=o.end_lr_ratio),
        precision=cfg.train.precision, grad_clip=o.grad_clip, accum_steps=accum,
        activation_checkpointing=e.activation_checkpointing, backend=e.backend, zero_stage=e.zero_stage,
        offload_optimizer=e.offload_optimizer, micro_batch_size=micro, reshard_after_forward=e.reshard_after_forward)


def build_train_loss(cfg: DictConfig) -> nn.Module:
    return build_loss(cfg.optim.loss, cfg.optim.label_smoothing)


def memory_report(cfg: DictConfig, world_size: int, where: str) -> str:
    """The estimate for `world_size` ranks without allocating the model (meta device)."""
    with torch.device("meta"):
        model = build_model(cfg, where)
    info = DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
    engine = cfg.engine.kind + (f" ZeRO-{cfg.engine.zero_stage}" if cfg.engine.kind == "deepspeed" else "")
    micro, accum = batch_layout(cfg, info, where)
    return (f"{cfg.model.name} on {engine}, {world_size} ranks, micro batch {micro} x {accum}: "
            + build_memory_estimate(cfg, model, info, where).describe())


def build_memory_estimate(cfg: DictConfig, model: nn.Module, dist_info: DistInfo, where: str) -> MemoryEstimate:
    micro, _ = batch_layout(cfg, dist_info, where)
    return estimate_memory(model, engine=effective_kind(cfg.engine.kind, dist_info), world_size=dist_info.world_size,
                           micro_batch_size=micro,
                           precision=cfg.train.precision, zero_stage=cfg.engine.zero_stage,
                           offload_optimizer=cfg.engine.offload_optimizer,
                           activation_checkpointing=cfg.engine.activation_checkpointing)


def build_storage(cfg: DictConfig) -> Storage:
    """The one storage handle of the run's data URLs (shards, manifests, demo data), from ``data.storage``."""
    st = cfg.data.storage
    return Storage(s3_endpoint=st.s3_endpoint, s3_profile=st.s3_profile, s3_anon=st.s3_anon,
                   retries=st.retries, backoff_s=st.backoff_s, give_up_after_s=st.give_up_after_s)


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
    try:
        return TrainLoader(sources, batch_size=batch_size, transform=transform, seed=cfg.train.seed,
                           rank=dist_info.rank, world_size=dist_info.world_size, num_workers=d.num_workers,
                           shuffle_buffer=d.shuffle_buffer, pin_memory=dist_info.device.type == "cuda",
                           epoch_mode=d.epoch_mode, storage=build_storage(cfg))
    except DataSpecError as exc:
        where = "data.sources" if d.sources else "data.train"
        raise type(exc)(f"{where}: {exc}; set {where} to your shards' manifest (.json)") from None


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


def build_evaluators(cfg: DictConfig, dist_info: DistInfo, autocast: Callable[[], Any]) -> list[Evaluator]:
    """``autocast``: the training engine's (or, outside training, one for ``train.precision``)."""
    e, d = cfg.eval, cfg.data
    forward = Forward(prepare=_prepare(cfg, dist_info.device, None), autocast=autocast)  # never mixed
    transform = EvalTransform(d.image_size, crop_fraction=d.crop_fraction)
    batches = partial(eval_batches, batch_size=e.batch_size, transform=transform, num_workers=0,
                      storage=build_storage(cfg))
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
        ft_batches = partial(batches, transform=EvalTransform(f.image_size or d.image_size,
                                                              crop_fraction=d.crop_fraction))
        evaluators.append(FineTuneEvaluator(
            partial(ft_batches, f.train), partial(ft_batches, f.test), forward,
            num_classes=f.num_classes or _manifest_classes(f.train, "eval.finetune.train", build_storage(cfg)),
            steps=f.steps,
            batch_size=f.batch_size, lr=f.lr, warmup_steps=f.warmup_steps, hflip=f.hflip, dist_info=dist_info,
            seed=cfg.train.seed, time_budget_s=f.time_budget_s))
    return evaluators


def _manifest_classes(spec: str, key: str, storage: Storage) -> int:
    from data_pipeline.shards import read_manifest

    if not spec.endswith(".json"):
        raise ConfigError(f"'{key}' {spec!r} is not a manifest; set 'eval.finetune.num_classes'")
    manifest = read_manifest(spec, storage)
    if not manifest.get("num_classes"):
        raise ConfigError(f"{spec}: the manifest gives no num_classes; set 'eval.finetune.num_classes'")
    return int(manifest["num_classes"])


def build_loss_guard(cfg: DictConfig) -> LossGuard:
    return LossGuard(cfg.train.spike_factor, cfg.train.max_bad_steps)


def build_checkpointer(cfg: DictConfig, dist_info: DistInfo) -> Checkpointer:
    c = cfg.checkpoint
    return Checkpointer(cfg.run.dir, dist_info, keep_last=c.keep_last, keep_every=c.keep_every,
                        async_save=c.async_save)


def build_monitor(cfg: DictConfig, dist_info: DistInfo, model: nn.Module) -> Monitor:
    t = cfg.train
    return Monitor(cfg.run.dir, dist_info, t.steps, t.log_every, t.global_batch_size, model.flops_per_image(),
                   t.precision)


def build_eval_runner(cfg: DictConfig, dist_info: DistInfo, autocast: Callable[[], Any],
                      scalars: Callable[[int, dict], None]) -> EvalRunner:
    """The inline evaluators after each checkpoint; with eval.mode external or none the runner has none
    (training only writes checkpoints and `python -m pretrain.evaluate` evaluates them)."""
    evaluators = build_evaluators(cfg, dist_info, autocast) if cfg.eval.mode == "inline" else []
    return EvalRunner(evaluators, cfg.run.dir, dist_info, scalars)


def build_preemption_watcher(dist_info: DistInfo) -> PreemptionWatcher:
    """SIGTERM / SIGUSR1 (SLURM's warning, a spot reclaim) -> checkpoint at the step boundary, exit for requeue."""
    return PreemptionWatcher(dist_info)
