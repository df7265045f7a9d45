"""The one place where the config tree becomes objects: model, data streams, engine, evaluators."""
from __future__ import annotations

import logging
import os
import shutil
from functools import partial
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data_pipeline.image.augment import MixupCutmix, RandAugment
from data_pipeline.demo import ensure_demo_data
from data_pipeline.image.device import BatchToDevice
from data_pipeline.errors import DataSpecError, first_line
from data_pipeline.stream.eval_stream import eval_batches
from data_pipeline.image.gpu_decode import CropPlanner, gpu_decode_available
from data_pipeline.stream.sources import DataSource
from data_pipeline.storage import Storage
from data_pipeline.storage.cache import ShardCache
from data_pipeline.stream.train_loader import TrainLoader
from data_pipeline.image.transforms import TrainTransform, partial_decode_missing

from .checkpoint import Checkpointer
from .config import ConfigError, TorchFTOptions, engine_options
from .data_check import check_data_paths, manifest_num_classes, placeholder_error
from .dist import DistInfo, barrier, broadcast_object, node_leaders
from .engines import Engine, build_engine, effective_kind
from .evaluation import EVALUATORS, EvalContext, EvalRunner, Evaluator
from .faults import Faults
from .loss import build_loss
from .loss_guard import LossGuard
from .memory import GIB, MachineMemory, MemoryEstimate, estimate_memory, host_memory
from .models import apply_mlp_impl, create_model
from .monitor import WANDB_INSTALL, Monitor, WandbWriter
from .optim import build_optimizer, build_scheduler
from .profiling import StepProfiler
from .run_lease import RunDirBusy, RunDirUnusable, RunLease, check_run_dir

log = logging.getLogger("pretrain")


def replica_groups(cfg: DictConfig) -> int:
    """Replica groups the global batch is split over (engine.fault_tolerance=torchft), else 1."""
    return cfg.engine.torchft.replica_groups if cfg.engine.fault_tolerance == "torchft" else 1


def replica_group_run_dir(cfg: DictConfig) -> DictConfig:
    """Under engine.fault_tolerance=torchft each replica group owns `<run.dir>/replica_<N>` (its lease, its
    checkpoints, its logs): groups come and go on their own, and after a full restart each resumes from its
    own newest checkpoint while the quorum brings any that are behind up to the newest step, from a peer."""
    if cfg.engine.fault_tolerance != "torchft":
        return cfg
    fixed = cfg.copy()
    OmegaConf.set_readonly(fixed, False)
    fixed.run.dir = f"{str(cfg.run.dir).rstrip('/')}/replica_{int(os.environ.get('REPLICA_GROUP_ID', '0'))}"
    OmegaConf.set_readonly(fixed, True)
    return fixed


def batch_layout(cfg: DictConfig, dist_info: DistInfo, where: str) -> tuple[int, int]:
    """(micro batch per rank, micro batches per step) with micro x accum x world = global batch.
    The global batch (and so the lr) is given once; whichever of the two is not given is derived."""
    g, world = cfg.train.global_batch_size, dist_info.world_size * replica_groups(cfg)
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


def prepare_data(cfg: DictConfig, dist_info: DistInfo, storage: Storage, where: str = "config") -> None:
    """Generate the demo data on first use, once per node (local rank 0 writes, the others wait): a
    node-local data.root is filled on every node. The nodes take turns, so on a shared file system
    the first one writes and the others find it done. The paths outside data.root (a placeholder left
    in place, data elsewhere) are checked first: a wrong one stops the run before a minute of generation."""
    if cfg.data.prepare == "demo":
        check_data_paths(cfg, storage, where, generated=cfg.data.root)
        for leader in node_leaders(dist_info):
            if dist_info.rank == leader:
                ensure_demo_data(cfg.data.root, storage, image_size=cfg.data.image_size, seed=cfg.train.seed)
            barrier()


def check_data(cfg: DictConfig, storage: Storage, where: str, train: bool = True) -> None:
    """Every data path the run reads (training, data.val, each enabled evaluator's splits) is there:
    checked before the engine is built, so a wrong eval path is not found hours later."""
    check_data_paths(cfg, storage, where, train)


def resolve_num_classes(cfg: DictConfig, storage: Storage, where: str) -> DictConfig:
    """The config with model.num_classes a number: `auto` takes the training manifest's; a number given
    that disagrees with the manifest stops the run (a head of the wrong size trains without a word)."""
    given = cfg.model.num_classes
    if given != "auto":
        try:
            found = manifest_num_classes(cfg, storage, where)
        except DataSpecError:  # shards without a manifest (or one without counts): the number given stands
            return cfg
        if found != given:
            key = "data.sources" if cfg.data.sources else "data.train"
            raise ConfigError(f"{where}: 'model.num_classes' is {given} but the manifest of {key} has {found} "
                              f"classes; set model.num_classes={found} or model.num_classes=auto")
        return cfg
    resolved = cfg.copy()
    OmegaConf.set_readonly(resolved, False)
    resolved.model.num_classes = manifest_num_classes(cfg, storage, where)
    OmegaConf.set_readonly(resolved, True)
    return resolved


# bench/results/cpu_precision_{amx,avx2}.json: one Mixer-S/32 training step at batch 16 on a 2-core Xeon, with
# its AMX / AVX512-BF16 and restricted to AVX2 (what a CPU without native bf16 runs).
CPU_BF16_COST = "10 to 20x the fp32 step time (Mixer-S/32 at batch 16: 122 to 216 s per step against 6 to 16 s)"


def cpu_native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX, and torch's kernels not held to AVX2 by
    ATEN_CPU_CAPABILITY): there bf16 autocast is not slower than fp32."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without the probes: assume the common case, no native bf16
        return False
    return bool(native) and torch.backends.cpu.get_cpu_capability() == "AVX512"


def auto_precision(device: torch.device | str) -> tuple[str, str]:
    """What `train.precision: auto` stands for on `device`, and why. A CUDA device not visible here (an
    estimate made for GPUs on a machine without one) is taken to be one with bf16 (Ampere or newer).
    A CPU gets fp32 everywhere, so that a config gives the same numbers on every CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "bf16", "assumed: a GPU with bf16 support, Ampere or newer"
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} runs bf16 on its tensor cores"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no fast bf16"
    if device.type == "cpu" and cpu_native_bf16():
        return "fp32", "the CPU default; this CPU has AVX512-BF16/AMX, where train.precision=bf16 is faster"
    return "fp32", f"the CPU default; bf16 autocast on a CPU without AVX512-BF16 or AMX costs {CPU_BF16_COST}"


def resolve_precision(cfg: DictConfig, device: torch.device | str, where: str = "config",
                      announce: bool = True) -> DictConfig:
    """The config with train.precision a dtype (fp32, bf16, fp16): `auto` becomes what `device` runs fast,
    logged once (``announce``: rank 0); an explicit bf16/fp16 on a CPU without native bf16 stays, with one
    warning of its cost."""
    chosen, device = cfg.train.precision, torch.device(device)
    if chosen != "auto":
        if announce and chosen in ("bf16", "fp16") and device.type == "cpu" and not cpu_native_bf16():
            log.warning("%s: 'train.precision' is %s on a CPU without AVX512-BF16 or AMX, where autocast costs %s; "
                        "set train.precision=auto (fp32 here) unless you mean to test %s", where, chosen,
                        CPU_BF16_COST, chosen)
        return cfg
    precision, why = auto_precision(device)
    if announce:
        log.info("precision %s (train.precision auto: %s)", precision, why)
    resolved = cfg.copy()
    OmegaConf.set_readonly(resolved, False)
    resolved.train.precision = precision
    OmegaConf.set_readonly(resolved, True)
    return resolved


def build_model(cfg: DictConfig, where: str = "config", mlp_impl: bool = True) -> nn.Module:
    """The model of `cfg`; ``mlp_impl=False``: eager MLPs (shapes only, e.g. on the meta device for an estimate)."""
    if cfg.model.num_classes == "auto":
        raise ConfigError(f"{where}: 'model.num_classes' is 'auto' here; resolve it from the manifest first")
    model = _create_model(cfg, cfg.model.num_classes, where)
    return apply_mlp_impl(model, cfg.model.mlp_impl) if mlp_impl else model


def check_model_config(cfg: DictConfig, where: str = "config") -> None:
    """The model's own settings and data.image_size, on the meta device (shapes only, no class count needed):
    a config error found in a second, before demo data is generated or any data is read."""
    with torch.device("meta"):
        _create_model(cfg, 1, where)


def _create_model(cfg: DictConfig, num_classes: int, where: str) -> nn.Module:
    # One resolution: data.image_size (model.img_size, when set, agrees: pretrain/config.py validate).
    overrides = {"drop_rate": cfg.model.drop_rate, "drop_path_rate": cfg.model.drop_path_rate,
                 "img_size": cfg.data.image_size}
    if cfg.model.act is not None:
        overrides["act"] = cfg.model.act  # the model names the valid ones (gelu, gelu_tanh for Mixer)
    try:
        model = create_model(cfg.model.name, num_classes=num_classes, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: model: {e}") from None
    return model


def build_train_engine(cfg: DictConfig, model: nn.Module, dist_info: DistInfo, where: str = "config",
                       loader: TrainLoader | None = None) -> Engine:
    """`loader`: the training stream, which fault tolerance (engine.fault_tolerance=torchft) lays out
    over the replica groups of each step's quorum and carries through a live recovery."""
    o, e = cfg.optim, cfg.engine
    micro, accum = batch_layout(cfg, dist_info, where)
    if e.fault_tolerance == "torchft":
        if e.kind == "deepspeed":
            raise ConfigError(f"{where}: engine.fault_tolerance=torchft runs engine.kind single, ddp or fsdp, not "
                              "deepspeed (DeepSpeed ZeRO is not covered; see docs/faults.md)")
        if cfg.train.precision == "fp16":
            raise ConfigError(f"{where}: engine.fault_tolerance=torchft needs train.precision bf16 or fp32 (fp16's "
                              "loss scale would be decided per replica group)")
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
        activation_checkpointing=e.activation_checkpointing, backend=e.backend, options=engine_options(e),
        micro_batch_size=micro,
        fault_tolerance=TorchFTOptions(**e.torchft) if e.fault_tolerance == "torchft" else None, loader=loader)


def build_train_loss(cfg: DictConfig) -> nn.Module:
    return build_loss(cfg.optim.loss, cfg.optim.label_smoothing)


def memory_estimate(cfg: DictConfig, world_size: int, where: str, model: nn.Module | None = None,
                    device_type: str = "cpu", rank: int = 0) -> tuple[str, MemoryEstimate]:
    """The memory estimate of this config on `world_size` ranks, and its one-line report. Without `model`
    it is built on the meta device (no memory, no init), as for `main.py --estimate-memory`."""
    note = ""
    if model is None:
        if cfg.model.num_classes == "auto":
            cfg, note = _classes_for_estimate(cfg, where)
        with torch.device("meta"):
            model = build_model(cfg, where, mlp_impl=False)  # the MLP kernels do not change the memory
    info = DistInfo(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
    e = cfg.engine
    micro, accum = batch_layout(cfg, info, where)
    estimate = estimate_memory(model, engine=effective_kind(e.kind, info), world_size=world_size,
                               micro_batch_size=micro, precision=cfg.train.precision, zero_stage=e.deepspeed.zero_stage,
                               offload_optimizer=e.deepspeed.offload_optimizer,
                               activation_checkpointing=e.activation_checkpointing, device_type=device_type,
                               async_checkpoint=cfg.checkpoint.async_save, num_workers=data_workers(cfg),
                               image_size=cfg.data.image_size, rank=rank)
    engine = e.kind + (f" ZeRO-{e.deepspeed.zero_stage}" if e.kind == "deepspeed" else "")
    line = (f"{cfg.model.name} on {engine}, {world_size} ranks, micro batch {micro} x {accum}, {device_type}: "
            f"{estimate.describe()}{note}")
    return line, estimate


ASSUMED_GPU_GIB = 80.0  # --estimate-memory for GPUs on a machine without one: an 80 GiB H100 / A100


def memory_report(cfg: DictConfig, world_size: int, where: str, device_type: str = "cpu",
                  gpu_memory_gib: float | None = None) -> str:
    """`main.py --estimate-memory`: the estimate of this config on `world_size` ranks (see memory_estimate)
    for `device_type`, then a verdict against what one rank would have: on a CPU this host's available memory
    shared by the ranks (all on this host), on a GPU the visible GPU's memory, else `gpu_memory_gib`
    (default ASSUMED_GPU_GIB, said so)."""
    cfg = resolve_precision(cfg, device_type, where, announce=False)
    line, estimate = memory_estimate(cfg, world_size, where, device_type=device_type)
    if device_type == "cpu":
        need, have = estimate.host, host_memory(world_size)
        where_ = f"the {have.available / GIB:.1f} GiB of {have.what} available now"
    else:
        need = estimate.total
        if gpu_memory_gib is None and torch.cuda.is_available():
            have_bytes = torch.cuda.get_device_properties(0).total_memory
            where_ = f"the {have_bytes / GIB:.1f} GiB of {torch.cuda.get_device_name(0)}"
        else:
            have_bytes = int((gpu_memory_gib or ASSUMED_GPU_GIB) * GIB)
            where_ = (f"a {have_bytes / GIB:.0f} GiB GPU ({'given' if gpu_memory_gib else 'assumed: no GPU here'}; "
                      "--gpu-memory-gib sets it)")
        have = MachineMemory(have_bytes, have_bytes, "GPU memory")
    share = f"{need / GIB:.2f} GiB per {'rank' if device_type == 'cpu' else 'device'} against {where_}"
    if need <= have.available:
        verdict = f"fits: {share} ({need / max(1, have.available):.0%})"
    else:
        verdict = f"does not fit: {share}; {_memory_advice(cfg)}"
    if device_type == "cpu" and cfg.train.device == "auto":
        verdict += " (estimated for this machine's CPU, where train.device auto runs; train.device=cuda: for GPUs)"
    return f"memory estimate: {line}\nverdict: {verdict}"


def check_memory_fit(cfg: DictConfig, estimate: MemoryEstimate, dist_info: DistInfo, where: str) -> None:
    """Stop before step 1 when the estimate exceeds what this machine has: one line with both numbers and
    what to change, instead of the kernel killing a rank at its first checkpoint (seen by the others as a
    gloo 'Connection reset by peer'). train.memory_check=false skips it."""
    if not cfg.train.memory_check:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needs: list[tuple[int, MachineMemory]] = [(estimate.host, host_memory(local_ranks))]
    if dist_info.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(dist_info.device)
        name = f"{dist_info.device} ({torch.cuda.get_device_name(dist_info.device)})"
        needs.append((estimate.total, MachineMemory(free + torch.cuda.memory_reserved(dist_info.device), total, name)))
    for need, have in needs:
        if need > have.available:
            raise ConfigError(f"{where}: the run needs about {need / GIB:.1f} GiB of {have.what} per rank (memory "
                              f"estimate above) but {have.available / GIB:.1f} GiB is available there; "
                              f"{_memory_advice(cfg)}, or train.memory_check=false to start anyway")


def _memory_advice(cfg: DictConfig) -> str:
    e, advice = cfg.engine, []
    if e.kind != "deepspeed" or e.deepspeed.zero_stage < 3:
        advice.append("sharding over more ranks (engine.kind=fsdp, or engine.kind=deepspeed "
                      "engine.deepspeed.zero_stage=3)")
    if e.kind == "deepspeed" and not e.deepspeed.offload_optimizer:
        advice.append("engine.deepspeed.offload_optimizer=true")
    if not e.activation_checkpointing:
        advice.append("engine.activation_checkpointing=true")
    advice.append("a smaller train.micro_batch_size (more grad_accum_steps)")
    if cfg.checkpoint.async_save:
        advice.append("checkpoint.async_save=false")
    if data_workers(cfg) > 2:
        advice.append("fewer data.num_workers")
    return "try " + ", ".join(advice[:-1]) + " or " + advice[-1]


def _classes_for_estimate(cfg: DictConfig, where: str) -> tuple[DictConfig, str]:
    """model.num_classes auto for an estimate made before the data is there: the manifest's count if it
    can be read, else a 1000-class head, said so in the line."""
    if not cfg.data.sources and placeholder_error("data.train", cfg.data.train, where) is None:
        try:
            return resolve_num_classes(cfg, build_storage(cfg), where), ""
        except DataSpecError:
            pass
    fixed = cfg.copy()
    OmegaConf.set_readonly(fixed, False)
    fixed.model.num_classes = 1000
    return fixed, " (head counted for 1000 classes: model.num_classes is auto and data.train is not readable)"


def build_storage(cfg: DictConfig) -> Storage:
    """The one storage handle of the run's data URLs (shards, manifests, demo data), from ``data.storage``."""
    st = cfg.data.storage
    return Storage(s3_endpoint=st.s3_endpoint, s3_profile=st.s3_profile, s3_anon=st.s3_anon,
                   retries=st.retries, backoff_s=st.backoff_s, give_up_after_s=st.give_up_after_s)


def build_shard_cache(cfg: DictConfig) -> ShardCache | None:
    """The node-local shard cache of ``data.cache`` (None: off); ``max_bytes`` 0 takes 90% of the disk's free space."""
    c = cfg.data.cache
    if not c.dir:
        return None
    path = c.dir[len("file://"):] if c.dir.startswith("file://") else c.dir
    try:
        os.makedirs(path, exist_ok=True)
        free = shutil.disk_usage(path).free
    except OSError as exn:
        raise DataSpecError(f"data.cache.dir {c.dir!r} cannot be used ({exn.strerror or exn}): set it to a "
                            f"writable directory on the node's local disk, or '' to turn the cache off") from None
    return ShardCache(path, int(c.max_bytes) or int(0.9 * free))


AUTO_WORKERS_MAX = 10  # enough to decode and crop for one GPU at the paper's sizes


def data_workers(cfg: DictConfig, local_ranks: int | None = None) -> int:
    """``data.num_workers``, with auto resolved: min(10, the CPUs this process may use / the ranks on this
    node), at least 1 (a 2-core machine gets 2 for one rank, not 10 that share 2 cores with the step)."""
    if cfg.data.num_workers != "auto":
        return int(cfg.data.num_workers)
    local_ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(AUTO_WORKERS_MAX, cpus // max(1, local_ranks)))


def build_train_loader(cfg: DictConfig, dist_info: DistInfo, batch_size: int, storage: Storage) -> TrainLoader:
    d = cfg.data
    a = d.augment
    randaugment = RandAugment(a.randaugment_ops, a.randaugment_magnitude) if a.randaugment_ops else None
    transform = TrainTransform(d.image_size, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
                               randaugment=randaugment, max_pixels=d.max_image_pixels)
    missing = partial_decode_missing()
    if d.decode != "gpu" and missing and dist_info.rank == 0:
        log.warning("%s", missing)
    if d.decode == "gpu":
        why_not = gpu_decode_available(dist_info.device)
        if why_not:
            log.warning("data.decode is 'gpu' but %s: decoding on the CPU workers instead", why_not)
        else:
            transform = CropPlanner(transform)  # workers read headers and draw crops; pixels come later
    sources = [DataSource(s.train, s.weight, s.name, s.label) for s in d.sources] or d.train
    workers = data_workers(cfg)
    if d.num_workers == "auto" and dist_info.rank == 0:
        log.info("data.num_workers auto: %d DataLoader worker(s) per rank", workers)
    try:
        return TrainLoader(sources, batch_size=batch_size, transform=transform, seed=cfg.train.seed,
                           rank=dist_info.rank, world_size=dist_info.world_size, num_workers=workers,
                           shuffle_buffer=d.shuffle_buffer, pin_memory=dist_info.device.type == "cuda",
                           epoch_mode=d.epoch_mode, storage=storage, label=d.label, cache=build_shard_cache(cfg),
                           num_classes=cfg.model.num_classes if isinstance(cfg.model.num_classes, int) else None)
    except DataSpecError as exc:
        where = "data.sources" if d.sources else "data.train"
        raise type(exc)(f"{where}: {exc}; set {where} to your shards' manifest (.json)") from None


def build_batch_to_device(cfg: DictConfig, dist_info: DistInfo, mix: bool = True) -> BatchToDevice:
    """Host batch -> model inputs on the device; ``mix``: with the config's mixup/cutmix (training only)."""
    d, a = cfg.data, cfg.data.augment
    mixer = MixupCutmix(cfg.model.num_classes, a.mixup_alpha, a.cutmix_alpha, a.mix_prob, a.mix_switch_prob,
                        seed=cfg.train.seed) if mix else None
    return BatchToDevice(dist_info.device, d.image_size, d.mean, d.std, mixer)


def build_evaluators(cfg: DictConfig, dist_info: DistInfo, autocast: Callable[[], Any],
                     storage: Storage) -> list[Evaluator]:
    """The evaluator of every enabled ``eval.<name>`` section, in config order, from the builder registered
    under that name (pretrain/evaluation/registry.py). ``autocast``: the training engine's (or, outside
    training, one for ``train.precision``)."""
    read = partial(eval_batches, batch_size=cfg.eval.batch_size, num_workers=0, storage=storage)
    ctx = EvalContext(cfg, dist_info, build_batch_to_device(cfg, dist_info, mix=False), autocast, read,
                      partial(_manifest_classes, storage=storage))
    evaluators: list[Evaluator] = []
    for name in cfg.eval:
        section = cfg.eval[name]
        if not isinstance(section, DictConfig):
            continue  # mode, baseline, batch_size: settings of the harness, not evaluators
        if name not in EVALUATORS:
            raise ConfigError(f"'eval.{name}' names no evaluator; registered: {', '.join(sorted(EVALUATORS))}")
        evaluator = EVALUATORS[name](section, ctx) if section.enabled else None
        if evaluator is not None:
            evaluators.append(evaluator)
    return evaluators


def _manifest_classes(spec: str, key: str, storage: Storage) -> int:
    from data_pipeline.shards.manifest import read_index

    if not spec.endswith(".json"):
        raise ConfigError(f"'{key}' {spec!r} is not a manifest; set 'eval.finetune.num_classes'")
    manifest = read_index(spec, storage).header
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
    """Progress lines and TensorBoard; with monitor.wandb also W&B (rank 0)."""
    t = cfg.train
    return Monitor(cfg.run.dir, dist_info, t.steps, t.log_every, t.global_batch_size, model.flops_per_image(),
                   t.precision, wandb=wandb_factory(cfg) if dist_info.is_main else None)


def wandb_factory(cfg: DictConfig, job: str = "train") -> Callable[[], WandbWriter] | None:
    """What makes the W&B writer of a `job` (train, or eval: `python -m pretrain.evaluate`) when monitor.wandb is
    set; None otherwise. Without the wandb package a monitor.wandb run says so in one line, with the install
    command, and logs to TensorBoard alone."""
    m = cfg.monitor
    if not m.wandb:
        return None
    try:
        import wandb as _  # noqa: F401
    except ImportError:
        log.warning("monitor.wandb is true but the wandb package is not installed: %s; logging to "
                    "TensorBoard only", WANDB_INSTALL)
        return None
    config = OmegaConf.to_container(cfg, resolve=True)
    return partial(_wandb_writer, cfg.run.dir, config, m.wandb_project, m.wandb_entity, m.wandb_name, job)


def _wandb_writer(run_dir: str, config: dict, project: str, entity: str, name: str, job: str) -> WandbWriter:
    try:
        return WandbWriter(run_dir, config, project, entity, name, job)
    except Exception as e:  # noqa: BLE001 -- W&B's own errors (login, network, settings) have no common base
        raise ConfigError(f"monitor.wandb: W&B did not start ({first_line(e)}); run `wandb login` or set "
                          "WANDB_API_KEY, or WANDB_MODE=offline to log locally, or monitor.wandb=false") from None


def build_eval_runner(cfg: DictConfig, dist_info: DistInfo, autocast: Callable[[], Any],
                      scalars: Callable[[int, dict], None], storage: Storage, in_training: bool = True,
                      on_record: Callable[[dict], None] | None = None) -> EvalRunner:
    """The evaluators of each checkpoint and the runner that records their results (``on_record``: also
    handed each record, rank 0: the monitor's last lines and W&B). In the training job
    they run only with eval.mode inline; with external or none training only writes checkpoints and
    `python -m pretrain.evaluate` (``in_training=False``) evaluates them."""
    wanted = not in_training or cfg.eval.mode == "inline"
    evaluators = build_evaluators(cfg, dist_info, autocast, storage) if wanted else []
    return EvalRunner(evaluators, cfg.run.dir, dist_info, scalars, on_record=on_record)


def build_profiler(cfg: DictConfig, dist_info: DistInfo) -> StepProfiler:
    """train.profile: torch.profiler traces of the listed steps in <run.dir>/profile."""
    return StepProfiler(cfg.run.dir, cfg.train.profile, dist_info)


def build_faults(cfg: DictConfig, dist_info: DistInfo, loader: TrainLoader, checkpointer: Checkpointer,
                 lease: RunLease | None, monitor: Monitor) -> Faults:
    """Each rank's stop flags and their one agreement per step (pretrain/faults.py); installs the handlers of
    SIGTERM / SIGUSR1 (SLURM's warning, a spot reclaim): checkpoint at the step boundary, exit for requeue."""
    return Faults(dist_info, loader, checkpointer, lease, cfg.train.steps, cfg.data.max_skip_fraction,
                  monitor.scalars)


def build_run_lease(cfg: DictConfig, dist_info: DistInfo) -> RunLease | None:
    """Rank 0 checks that the run dir is a writable directory and takes its lease (pretrain/run_lease.py);
    every rank gets its answer, so a busy or unusable run dir stops every rank with the same line
    (ConfigError). Other ranks hold None."""
    lease, error = None, None
    if dist_info.is_main:
        try:
            check_run_dir(cfg.run.dir)  # a directory this run can write to, and its checkpoint dir too
            lease = RunLease(cfg.run.dir, cfg.run.lease_timeout_s)
            lease.acquire()
        except (RunDirBusy, RunDirUnusable) as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise ConfigError(error)
    return lease
