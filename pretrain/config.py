"""The one config tree: typed schema, YAML files with `include:`, command-line overrides.

Every value a run uses lives here, with its default and why. Config files are merged onto the
schema one at a time so that an error names the file (or the command line) it came from, in one
line, with the closest valid key when a key is unknown.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem; its message is one line naming the key and where it came from."""


@dataclass
class RunConfig:
    name: str = "mixer"
    # Every artefact of a run (checkpoints, TensorBoard, eval records, resolved config) lives here.
    dir: str = "runs/${run.name}"


@dataclass
class ModelConfig:
    name: str = "mixer_b16_224"  # any name from pretrain.models.list_models()
    num_classes: int = 1000
    img_size: Optional[int] = None  # None: the variant's own resolution
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # MLP activation: null = the variant's own (gelu, exact erf, for every Mixer, as timm's ports);
    # gelu_tanh = flax's nn.gelu, which the official JAX checkpoints were trained with (load them with it).
    act: Optional[str] = None
    # How the Mixer MLPs run: eager | compile (torch.compile per block) | fused (Triton MLPs and
    # residual add + LayerNorm, bf16/fp16 only; falls back to eager with one warning where Triton
    # or CUDA is missing).
    mlp_impl: str = "eager"


@dataclass
class AugmentConfig:
    # Inception-style crop as in the paper's pre-training; scale lower bound 0.08 is the usual default.
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: bool = True
    # RandAugment on the CPU workers: ops per image (0 = off) and magnitude (0..30, 9 is the usual).
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    # Batch-wise mixup / cutmix on the device (0 = off); targets become soft [B, num_classes].
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # fraction of batches mixed
    mix_switch_prob: float = 0.5  # cutmix instead of mixup when both are on


@dataclass
class SourceConfig:
    # One weighted training source; weights are normalised over data.sources.
    train: str = MISSING  # shard spec, as data.train
    weight: float = 1.0
    name: str = ""


@dataclass
class StorageConfig:
    # Object storage access; credentials come from the environment / the SDK chain, never from here.
    s3_endpoint: str = ""  # e.g. http://minio:9000; "" = AWS (or AWS_ENDPOINT_URL in the environment)
    s3_profile: str = ""  # ~/.aws profile name; "" = default chain
    s3_anon: bool = False  # public buckets
    retries: int = 5  # further attempts after a failed shard open/read, with exponential back-off
    backoff_s: float = 0.5


@dataclass
class DataConfig:
    # `demo` generates the synthetic shapes set and the digits downstream set under `root` on first
    # use; `none` expects `train`/`val` to exist already.
    prepare: str = "none"
    root: str = "data/demo"
    # Shard specs: a brace pattern (`s3://b/train-{000000..000999}.tar`), a `::`-separated list, or a
    # manifest `.json` written by data_pipeline.
    train: str = MISSING
    val: str = ""  # held-out upstream shards; "" disables the upstream evaluation
    image_size: int = 224
    num_workers: int = 8
    shuffle_buffer: int = 10_000
    crop_fraction: float = 0.875  # eval: resize to size/0.875, centre-crop size
    # Normalisation happens on the device, after the uint8 batch has been copied there.
    mean: List[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    std: List[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Several weighted sources mixed per batch; when non-empty it replaces `train`.
    sources: List[SourceConfig] = field(default_factory=list)
    # exact: every epoch visits each sample once (at most world_size - 1 dropped per epoch end);
    # resampled: each epoch draws its shards with replacement.
    epoch_mode: str = "exact"
    # cpu: decode + crop/flip in the DataLoader workers; gpu: JPEG bytes go to the device and are decoded
    # there in batches (nvJPEG via torchvision), falling back to cpu with one warning where unavailable.
    decode: str = "cpu"
    storage: StorageConfig = field(default_factory=StorageConfig)
    # Corrupt or unreadable samples are skipped and counted; above this fraction the run stops,
    # because a silently shrinking data set is worse than a clear failure.
    max_skip_fraction: float = 0.01


@dataclass
class OptimConfig:
    # Paper recipe: Adam(0.9, 0.999), linear warm-up, linear decay, global-norm clipping at 1.
    lr: float = 1e-3  # peak learning rate for the global batch below
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW); never applied to norms and biases
    warmup_steps: int = 10_000
    schedule: str = "linear"  # linear | cosine decay after warm-up
    end_lr_ratio: float = 0.0  # lr at the last step, as a fraction of the peak
    grad_clip: float = 1.0  # global L2 norm; 0 disables clipping
    label_smoothing: float = 0.0
    # softmax: cross-entropy over classes. sigmoid: independent per-class binary CE summed over
    # classes (the paper's upstream option for multi-label JFT / ImageNet-21k).
    loss: str = "softmax"


@dataclass
class TrainConfig:
    steps: int = MISSING
    global_batch_size: int = 4096  # split evenly across ranks
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds dynamic loss scaling)
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    log_every: int = 50
    # Per-rank micro batch; null derives it from global batch / world size (with grad_accum_steps).
    micro_batch_size: Optional[int] = None
    # Micro batches per optimiser step; null: 1 unless micro_batch_size forces more.
    grad_accum_steps: Optional[int] = None
    # A non-finite loss, or one above spike_factor x the running mean, skips the step instead of
    # corrupting the weights; max_bad_steps in a row stop the run (something is broken, not noisy).
    spike_factor: float = 0.0  # 0 disables spike detection (non-finite losses are always skipped)
    max_bad_steps: int = 5


@dataclass
class EngineConfig:
    kind: str = "ddp"  # single | ddp | fsdp | deepspeed; with one process `ddp` runs as `single`
    backend: str = "auto"  # auto: nccl on cuda, gloo on cpu
    zero_stage: int = 2  # deepspeed only: 1 | 2 | 3 (optimizer / +gradients / +parameters sharded)
    offload_optimizer: bool = False  # deepspeed only: optimizer states in CPU memory
    # fsdp: free the gathered block weights after forward (less memory, one more all-gather in backward).
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False  # recompute each Mixer block in backward (any engine)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    # Also save when this much wall time has passed since the last save (0: off): bounds the work a
    # crash can cost when step times vary. Checked on log steps (train.log_every).
    every_minutes: float = 0.0
    # Training stalls only to copy the state to host memory; serialising, hashing, uploading and
    # publishing run on a checkpoint thread (one save at a time, costs one host copy of the state).
    async_save: bool = False
    # auto: continue from the newest valid checkpoint in run.dir if there is one; never: refuse to
    # start in a run dir that already holds checkpoints (so nothing is overwritten by accident).
    resume: str = "auto"


@dataclass
class UpstreamEvalConfig:
    enabled: bool = True  # top-1/top-5/loss on data.val


@dataclass
class FewShotEvalConfig:
    enabled: bool = False
    train: str = ""  # shard spec of the downstream train split
    test: str = ""
    shots: List[int] = field(default_factory=lambda: [1, 5, 10, 25])
    seeds: int = 3
    # Ridge strengths tried; the one with the best accuracy on held-out training samples is used.
    l2_regs: List[float] = field(default_factory=lambda: [2.0**k for k in range(-6, 15, 2)])


@dataclass
class LinearProbeEvalConfig:
    enabled: bool = False
    train: str = ""  # shard spec of the downstream train split (all of it is used)
    test: str = ""
    # Logistic-regression l2 strengths tried; the best on a held-out 20 % of train is refit on all of it.
    l2_regs: List[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])


@dataclass
class FineTuneEvalConfig:
    # The paper's transfer recipe scaled down: SGD momentum 0.9, warm-up + cosine, clip 1, no weight decay.
    enabled: bool = False
    train: str = ""
    test: str = ""
    num_classes: int = 0  # 0: read from the train split's manifest
    steps: int = 500
    batch_size: int = 512
    lr: float = 0.01
    warmup_steps: int = 50
    hflip: bool = True  # off for sets where a mirror image is another class (digits, text)
    # Fine-tune resolution; 0: data.image_size. A Mixer moves to a new grid the paper's way (block-
    # diagonal token-mixing weights), so it must be an integer multiple of the pre-training size.
    image_size: int = 0
    time_budget_s: float = 0.0  # stop and record an error past this many seconds; 0: no limit


@dataclass
class EvalConfig:
    # Runs after every checkpoint; a failing evaluator is logged and recorded, never fatal.
    # inline: on the training ranks right after each checkpoint; external: training only writes
    # checkpoints and a watcher / SLURM job runs `python -m pretrain.evaluate`; none: no evaluation.
    mode: str = "inline"
    # Evaluate the initial (random) weights as step 0, so every run's table holds the baseline
    # that later checkpoints must beat.
    baseline: bool = True
    batch_size: int = 256
    upstream: UpstreamEvalConfig = field(default_factory=UpstreamEvalConfig)
    fewshot: FewShotEvalConfig = field(default_factory=FewShotEvalConfig)
    linear_probe: LinearProbeEvalConfig = field(default_factory=LinearProbeEvalConfig)
    finetune: FineTuneEvalConfig = field(default_factory=FineTuneEvalConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Values with a closed set of choices; checked after merging so the message can name the source.
CHOICES = {
    "data.prepare": ("none", "demo"),
    "model.mlp_impl": ("eager", "compile", "fused"),
    "data.epoch_mode": ("exact", "resampled"),
    "data.decode": ("cpu", "gpu"),
    "optim.schedule": ("linear", "cosine"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "engine.kind": ("single", "ddp", "fsdp", "deepspeed"),
    "optim.loss": ("softmax", "sigmoid"),
    "engine.backend": ("auto", "gloo", "nccl"),
    "checkpoint.resume": ("auto", "never"),
    "eval.mode": ("inline", "external", "none"),
}
INCLUDE_KEY = "include"


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k in node.keys() if isinstance(node, DictConfig) else ():
        full = f"{prefix}{k}"
        keys.append(full)
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            keys.extend(_all_keys(child, full + "."))
    return keys


def _one_line(err: OmegaConfBaseException, source: str, schema: DictConfig) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "not in" in first or "Key '" in first and "not" in first:
        close = difflib.get_close_matches(str(key), _all_keys(schema), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(f"{source}: unknown key '{key}'{hint}")
    if key == "?":
        return ConfigError(f"{source}: {first}")
    return ConfigError(f"{source}: bad value for '{key}': {first}")


def _load_yaml(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The file and everything it includes, in merge order (includes first)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    if path in seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(seen)}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors carry multi-line context; keep the first line.
        raise ConfigError(f"{path}: cannot parse YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    out: list[tuple[str, DictConfig]] = []
    includes = node.pop(INCLUDE_KEY, None)
    if isinstance(includes, str):
        includes = [includes]
    for inc in includes or []:
        out += _load_yaml(os.path.join(os.path.dirname(path), str(inc)), seen + (path,))
    out.append((path, node))
    return out


def load_config(path: str | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file (and its includes) <- `dotted.key=value` overrides, validated."""
    schema = OmegaConf.structured(Config)
    sources = _load_yaml(path) if path else []
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise ConfigError(f"command line: cannot parse override: {str(e).splitlines()[0]}") from None
    sources.append(("command line", cli))

    cfg = schema.copy()
    for source, node in sources:
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _one_line(e, source, schema) from None
    where = path or "command line"
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{where}: missing value for '{missing[0]}'")
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _one_line(e, where, schema) from None
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{where}: '{key}' is {value!r}; choose one of {', '.join(allowed)}")
    _check_ranges(cfg, where)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_ranges(cfg: DictConfig, where: str) -> None:
    positive = ["train.steps", "train.global_batch_size", "train.log_every", "checkpoint.every_steps",
                "checkpoint.keep_last", "data.image_size", "eval.batch_size"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{where}: '{key}' must be > 0, got {OmegaConf.select(cfg, key)}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"{where}: 'data.num_workers' must be >= 0")
    if cfg.optim.warmup_steps < 0 or cfg.optim.lr <= 0:
        raise ConfigError(f"{where}: 'optim.lr' must be > 0 and 'optim.warmup_steps' >= 0")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"{where}: 'optim.betas' needs two values, got {list(cfg.optim.betas)}")
    for key in ("train.micro_batch_size", "train.grad_accum_steps", "train.max_bad_steps"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{where}: '{key}' must be > 0, got {value}")
    if cfg.engine.zero_stage not in (1, 2, 3):
        raise ConfigError(f"{where}: 'engine.zero_stage' is {cfg.engine.zero_stage}; choose one of 1, 2, 3")
    if cfg.train.spike_factor < 0 or 0 < cfg.train.spike_factor <= 1:
        raise ConfigError(f"{where}: 'train.spike_factor' must be 0 (off) or > 1, got {cfg.train.spike_factor}")
    if cfg.checkpoint.keep_every < 0:
        raise ConfigError(f"{where}: 'checkpoint.keep_every' must be >= 0")
    if cfg.checkpoint.every_minutes < 0:
        raise ConfigError(f"{where}: 'checkpoint.every_minutes' must be >= 0 (0: off)")
    if cfg.eval.fewshot.enabled and not (cfg.eval.fewshot.train and cfg.eval.fewshot.test):
        raise ConfigError(f"{where}: 'eval.fewshot.enabled' needs 'eval.fewshot.train' and 'eval.fewshot.test'")
    for task in ("linear_probe", "finetune"):
        section = cfg.eval[task]
        if section.enabled and not (section.train and section.test):
            raise ConfigError(f"{where}: 'eval.{task}.enabled' needs 'eval.{task}.train' and 'eval.{task}.test'")
    _check_data(cfg, where)


def _check_data(cfg: DictConfig, where: str) -> None:
    a, st = cfg.data.augment, cfg.data.storage
    for key in ("mixup_alpha", "cutmix_alpha"):
        if a[key] < 0:
            raise ConfigError(f"{where}: 'data.augment.{key}' must be >= 0, got {a[key]}")
    for key in ("mix_prob", "mix_switch_prob"):
        if not 0 <= a[key] <= 1:
            raise ConfigError(f"{where}: 'data.augment.{key}' must be in [0, 1], got {a[key]}")
    if a.randaugment_ops < 0 or not 0 <= a.randaugment_magnitude <= 30:
        raise ConfigError(f"{where}: 'data.augment.randaugment_ops' must be >= 0 and "
                          f"'data.augment.randaugment_magnitude' in [0, 30]")
    if st.retries < 0 or st.backoff_s < 0:
        raise ConfigError(f"{where}: 'data.storage.retries' and 'data.storage.backoff_s' must be >= 0")
    for i, source in enumerate(cfg.data.sources):
        if source.weight <= 0:
            raise ConfigError(f"{where}: 'data.sources.{i}.weight' must be > 0, got {source.weight}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
