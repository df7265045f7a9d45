"""The one config tree: typed schema, YAML files with `include:`, command-line overrides.

Every value a run uses lives here, with its default and why. Config files are merged onto the
schema one at a time so that an error names the file (or the command line) it came from, in one
line, with the closest valid key when a key is unknown.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, List, Optional, Sequence

import fsspec
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem; its message is one line naming the key and where it came from."""


@dataclass
class RunConfig:
    name: str = "mixer"
    # Every artefact of a run (checkpoints, TensorBoard, eval records, resolved config) lives here.
    dir: str = "runs/${run.name}"
    # One run owns run.dir (pretrain/run_lease.py): a second one stops at start. A lease whose heartbeat
    # (every quarter of this) is older than this is taken over: its owner died without releasing it.
    lease_timeout_s: float = 120.0


@dataclass
class ModelConfig:
    name: str = "mixer_b16_224"  # any name from pretrain.models.list_models()
    # auto: the training manifest's num_classes (or len(classes)); a number is checked against it at start.
    num_classes: Any = "auto"
    # The resolution is data.image_size: the model is built at it. null follows it; a number must agree.
    img_size: Optional[int] = None
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
    label: Optional[str] = None  # where this source's labels are (as data.label); null: data.label


@dataclass
class StorageConfig:
    # Object storage access; credentials come from the environment / the SDK chain, never from here.
    s3_endpoint: str = ""  # e.g. http://minio:9000; "" = AWS (or AWS_ENDPOINT_URL in the environment)
    s3_profile: str = ""  # ~/.aws profile name; "" = default chain
    s3_anon: bool = False  # public buckets
    retries: int = 5  # unused since give_up_after_s bounds retrying; kept so configs that set it still load
    backoff_s: float = 0.5  # first wait after a failed shard read; doubles per attempt, capped at 30 s
    # Transient storage failures (outage, 5xx, throttling, a listed object missing for a while) are retried
    # this long, then the run stops on every rank with one line naming the URL and saves nothing new.
    give_up_after_s: float = 600.0


@dataclass
class CacheConfig:
    # The node-local shard cache: remote shards are written once per node to `dir` (a local disk; "" = off)
    # and read from there by the node's ranks and workers in later epochs, restarts and resumes.
    dir: str = ""
    max_bytes: int = 0  # at most this many bytes; 0 = 90% of the disk's free space when the run starts


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
    # DataLoader workers per rank; auto: min(10, the CPUs this process may use / ranks on the node)
    num_workers: Any = "auto"
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
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Corrupt or unreadable samples are skipped and counted; above this fraction the run stops,
    # because a silently shrinking data set is worse than a clear failure.
    max_skip_fraction: float = 0.01
    # An image whose header asks for more pixels than this is a bad_image skip, refused before any decoder
    # allocates (a 430-byte JPEG can claim 20000x20000: 1-2.5 GB of coefficients). The default is Pillow's own
    # refusal threshold, above the largest camera photos (150 MP); raise it for scans or panoramas.
    max_image_pixels: int = 178_956_970
    # Where the labels are: cls (the .cls member, the default), txt (a class name in .txt) or json:FIELD
    # (an index or a class name in the .json member: img2dataset's `--save_additional_columns '["label"]'`
    # gives json:label); class names map through the manifest's classes (docs/manifest.md).
    label: str = "cls"


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
    # auto | fp32 | bf16 | fp16 (autocast; fp16 adds dynamic loss scaling). auto: bf16 on a GPU that runs it
    # (CUDA with bf16 support), fp32 elsewhere: bf16 autocast on a CPU is several times slower than fp32.
    precision: str = "auto"
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
    # Optimiser steps (1-based) traced with torch.profiler into <run.dir>/profile (pretrain/profiling.py),
    # with a CUDA memory snapshot where CUDA is present; e.g. [20, 21]: steps after the warm-up of the caches.
    profile: List[int] = field(default_factory=list)
    # Stop before step 1 when the memory estimate exceeds the host's (or the GPU's) free memory.
    memory_check: bool = True


@dataclass
class DeepSpeedOptions:
    """What only engine.kind=deepspeed takes: the `engine.deepspeed` section."""
    zero_stage: int = 2  # 1 | 2 | 3 (optimizer / +gradients / +parameters sharded)
    offload_optimizer: bool = False  # optimizer states in CPU memory


@dataclass
class FSDPOptions:
    """What only engine.kind=fsdp takes: the `engine.fsdp` section."""
    # Free the gathered block weights after forward (less memory, one more all-gather in backward).
    reshard_after_forward: bool = True


@dataclass
class TorchFTOptions:
    """engine.fault_tolerance=torchft: the `engine.torchft` section (docs/faults.md)."""
    replica_groups: int = 2  # groups the global batch is split over (each runs the engine on its own ranks)
    min_replicas: int = 1  # a step commits only with at least this many groups in its quorum
    lighthouse: str = ""  # http://host:port of torchft's lighthouse ("": $TORCHFT_LIGHTHOUSE, set by cluster.launch)
    timeout_s: float = 10.0  # a collective or recovery transfer across groups that takes longer fails the step
    quorum_timeout_s: float = 30.0  # the wait for a quorum; also how long a lost lighthouse takes to stop the run


@dataclass
class EngineConfig:
    kind: str = "ddp"  # single | ddp | fsdp | deepspeed; with one process `ddp` runs as `single`
    backend: str = "auto"  # auto: nccl on cuda, gloo on cpu
    activation_checkpointing: bool = False  # recompute each Mixer block in backward (any engine)
    # Each engine's own options, in a section named after it; the sections of the engines not chosen
    # are ignored, so one config file can carry them all and engine.kind=X switches on the command line.
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    fsdp: FSDPOptions = field(default_factory=FSDPOptions)
    # none | torchft: replica groups that vote a quorum each step; a failed group is dropped for the step
    # and the others go on, a new one recovers live from a peer (engine.kind single, ddp or fsdp = HSDP).
    fault_tolerance: str = "none"
    torchft: TorchFTOptions = field(default_factory=TorchFTOptions)


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
    # auto: continue from the newest valid checkpoint in run.dir if there is one (none verifying stops
    # the run); never: refuse to start in a run dir that already holds checkpoints (so nothing is
    # overwritten by accident); step_N: that checkpoint even if it fails verification, unless a verified
    # one at or after it exists (what a requeued run saved since).
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
    # Each section below is one evaluator, made by the builder registered under its name
    # (pretrain/evaluation/registry.py) when `enabled`; they run in this order.
    upstream: UpstreamEvalConfig = field(default_factory=UpstreamEvalConfig)
    fewshot: FewShotEvalConfig = field(default_factory=FewShotEvalConfig)
    linear_probe: LinearProbeEvalConfig = field(default_factory=LinearProbeEvalConfig)
    finetune: FineTuneEvalConfig = field(default_factory=FineTuneEvalConfig)


@dataclass
class MonitorConfig:
    # TensorBoard (<run.dir>/tb) always; also Weights & Biases with wandb: true (the optional extra
    # `pip install 'mixer-pretrain[wandb]'`): the same scalars and steps, the config, the eval records.
    wandb: bool = False
    wandb_project: str = ""  # "": WANDB_PROJECT from the environment, else mixer-pretrain
    wandb_entity: str = ""  # "": WANDB_ENTITY, else your W&B default entity
    wandb_name: str = ""  # "": WANDB_NAME, else W&B's generated name


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
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


INCLUDE_KEY = "include"
# Keys that moved: the old spelling is one line naming the new one (configs written before the move).
MOVED_KEYS = {"engine.zero_stage": "engine.deepspeed.zero_stage",
              "engine.offload_optimizer": "engine.deepspeed.offload_optimizer",
              "engine.reshard_after_forward": "engine.fsdp.reshard_after_forward"}
_UNSET = object()


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
        if str(key) in MOVED_KEYS:
            return ConfigError(f"{source}: '{key}' moved to '{MOVED_KEYS[str(key)]}'")
        close = difflib.get_close_matches(str(key), _all_keys(schema), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(f"{source}: unknown key '{key}'{hint}")
    if key == "?":
        return ConfigError(f"{source}: {first}")
    if "is not a ListConfig" in first:
        return ConfigError(f"{source}: '{key}' must be a list, e.g. {key}=[...]")
    return ConfigError(f"{source}: bad value for '{key}': {first}")


def _check_sections(node: Any, schema: Any, source: str, prefix: str = "") -> None:
    """A section given as something other than a mapping (`optim: [1, 2]`), named before omegaconf's
    merge reports it without the key."""
    if not isinstance(node, DictConfig) or not isinstance(schema, DictConfig):
        return
    for k in node.keys():
        if k not in schema:
            continue  # unknown keys: the merge names them, with a suggestion
        sub, sub_schema = node._get_node(k), schema._get_node(k)
        key = f"{prefix}{k}"
        if isinstance(sub_schema, DictConfig) and not isinstance(sub, DictConfig):
            raise ConfigError(f"{source}: '{key}' is a section of keys, got {OmegaConf.to_container(node)[k]!r}")
        _check_sections(sub, sub_schema, source, key + ".")


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
        _check_sections(node, schema, source)
        try:
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _one_line(e, source, schema) from None
    where = path or "command line"

    def blame(key: str) -> str:
        """The last file (or the command line) that set `key` or a section above it; else the config."""
        for source, node in reversed(sources):
            parts = key.split(".")
            for n in range(len(parts), 0, -1):
                if OmegaConf.select(node, ".".join(parts[:n]), default=_UNSET, throw_on_missing=False) is not _UNSET:
                    return source
        return where
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{where}: missing value for '{missing[0]}'")
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _one_line(e, where, schema) from None
    validate(cfg, blame)
    OmegaConf.set_readonly(cfg, True)
    return cfg


# ---- validation: one rule per key -------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What a key accepts: `ok(value)`, and `allowed`, the text an error shows after the key."""
    ok: Callable[[Any], bool]
    allowed: str
    choice: bool = False  # worded "is X; choose one of ..." rather than "must be ..., got X"

    def message(self, key: str, value: Any) -> str:
        shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
        if self.choice:
            return f"'{key}' is {shown!r}; {self.allowed}"
        return f"'{key}' must be {self.allowed}, got {shown!r}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def above(lo: float, note: str = "") -> Rule:
    return Rule(lambda v: _number(v) and v > lo, f"> {lo}{note}")


def at_least(lo: float, note: str = "") -> Rule:
    return Rule(lambda v: _number(v) and v >= lo, f">= {lo}{note}")


def within(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        return _number(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    return Rule(ok, f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def one_of(*choices: Any) -> Rule:
    return Rule(lambda v: v in choices, "choose one of " + ", ".join(map(str, choices)), choice=True)


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"null or {rule.allowed}")


def values(rule: Rule, n: int | None = None) -> Rule:
    """A list: `n` values (or at least one), each accepted by `rule`."""
    def ok(v: Any) -> bool:
        return isinstance(v, (list, ListConfig)) and (len(v) == n if n else len(v) > 0) and all(rule.ok(x) for x in v)
    return Rule(ok, f"{n if n else 'a list of'} values, each {rule.allowed}")


def ordered_pair(rule: Rule) -> Rule:
    """[low, high] with low <= high, both accepted by `rule` (crop scale and aspect-ratio ranges)."""
    inner = values(rule, 2)
    return Rule(lambda v: inner.ok(v) and v[0] <= v[1], f"[low, high] with low <= high, each {rule.allowed}")


def _scheme_known(url: str) -> bool:
    return "://" not in url or url.split("://", 1)[0].lower() in fsspec.available_protocols()


def location(required: bool = False) -> Rule:
    """A path or URL (shard specs: `::`-separated) whose scheme fsspec knows; '' only when optional."""
    def ok(v: Any) -> bool:
        parts = [p.strip() for p in str(v).split("::") if p.strip()] if isinstance(v, str) else None
        return parts is not None and (bool(parts) or not required) and all(map(_scheme_known, parts))
    schemes = "a local path or a URL with a scheme fsspec knows (file, s3, gs, http(s), ...)"
    return Rule(ok, schemes if required else f"'' or {schemes}")


def http_url_or_empty() -> Rule:
    return Rule(lambda v: isinstance(v, str) and (v == "" or re.match(r"^https?://[^/\s]+", v) is not None),
                "'' or an http(s):// URL")


POSITIVE, COUNT, FRACTION = above(0), at_least(0), within(0, 1)
LABEL = Rule(lambda v: isinstance(v, str) and (v in ("cls", "txt") or bool(re.match(r"^json:\S+$", v))),
             "cls, txt or json:FIELD")
# Every key with a bounded value: its rule, one line each. Keys with `*` apply to every list entry.
# tests/unit/test_config_validation.py checks that every numeric key of the schema has a rule here.
RULES: dict[str, Rule] = {
    "run.dir": location(required=True),
    "run.lease_timeout_s": above(0),
    "model.num_classes": Rule(lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                              "'auto' (from the training manifest) or an integer > 0"),
    "model.img_size": optional(POSITIVE),
    "model.drop_rate": within(0, 1, hi_open=True),
    "model.drop_path_rate": within(0, 1, hi_open=True),
    "model.mlp_impl": one_of("eager", "compile", "fused"),
    "data.prepare": one_of("none", "demo"),
    "data.root": location(required=True),
    "data.train": location(),
    "data.val": location(),
    "data.image_size": POSITIVE,
    "data.num_workers": Rule(lambda v: v == "auto" or (_number(v) and 0 <= v <= 256),  # thousands never start
                             "auto or a number in [0, 256]"),
    "data.shuffle_buffer": at_least(0, " (0 or 1: no shuffle)"),
    "data.crop_fraction": within(0, 1, lo_open=True),
    "data.mean": values(within(0, 255), 3),
    "data.std": values(within(0, 255, lo_open=True), 3),
    "data.augment.scale": ordered_pair(within(0, 1, lo_open=True)),
    "data.augment.ratio": ordered_pair(above(0)),
    "data.augment.randaugment_ops": COUNT,
    "data.augment.randaugment_magnitude": within(0, 30),
    "data.augment.mixup_alpha": COUNT,
    "data.augment.cutmix_alpha": COUNT,
    "data.augment.mix_prob": FRACTION,
    "data.augment.mix_switch_prob": FRACTION,
    "data.sources.*.train": location(required=True),
    "data.sources.*.weight": POSITIVE,
    "data.epoch_mode": one_of("exact", "resampled"),
    "data.decode": one_of("cpu", "gpu"),
    "data.storage.s3_endpoint": http_url_or_empty(),
    "data.storage.retries": within(0, 100),  # more would retry a dead store for hours: a hang
    "data.storage.backoff_s": within(0, 300),
    "data.storage.give_up_after_s": within(0, 7 * 86400, lo_open=True),
    "data.cache.dir": Rule(lambda v: isinstance(v, str) and ("://" not in v or v.startswith("file://")),
                           "'' (off) or a directory on the node's local disk (no URL)"),
    "data.cache.max_bytes": COUNT,
    "data.max_skip_fraction": FRACTION,
    "data.max_image_pixels": Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**62,
                                  "a whole number of pixels > 0"),
    "data.label": LABEL,
    "data.sources.*.label": optional(LABEL),
    "optim.lr": POSITIVE,
    "optim.betas": values(within(0, 1, hi_open=True), 2),
    "optim.eps": POSITIVE,
    "optim.weight_decay": COUNT,
    "optim.warmup_steps": COUNT,
    "optim.schedule": one_of("linear", "cosine"),
    "optim.end_lr_ratio": FRACTION,
    "optim.grad_clip": at_least(0, " (0: no clipping)"),
    "optim.label_smoothing": within(0, 1, hi_open=True),
    "optim.loss": one_of("softmax", "sigmoid"),
    "train.steps": POSITIVE,
    "train.global_batch_size": POSITIVE,
    "train.seed": within(0, 2**32 - 1),  # numpy seeds are 32-bit
    "train.precision": one_of("auto", "fp32", "bf16", "fp16"),
    "train.device": one_of("auto", "cpu", "cuda"),
    "train.log_every": POSITIVE,
    "train.micro_batch_size": optional(POSITIVE),
    "train.grad_accum_steps": optional(POSITIVE),
    "train.spike_factor": Rule(lambda v: _number(v) and (v == 0 or v > 1), "0 (off) or > 1"),
    "train.max_bad_steps": POSITIVE,
    "train.profile": Rule(lambda v: isinstance(v, (list, ListConfig)) and all(POSITIVE.ok(x) for x in v),
                          "a list of steps, each > 0 (e.g. [20, 21])"),
    "engine.kind": one_of("single", "ddp", "fsdp", "deepspeed"),
    "engine.backend": one_of("auto", "gloo", "nccl"),
    "engine.deepspeed.zero_stage": one_of(1, 2, 3),
    "engine.fault_tolerance": one_of("none", "torchft"),
    "engine.torchft.replica_groups": POSITIVE,
    "engine.torchft.min_replicas": POSITIVE,
    "engine.torchft.timeout_s": above(0),
    "engine.torchft.quorum_timeout_s": above(0),
    "checkpoint.every_steps": POSITIVE,
    "checkpoint.keep_last": POSITIVE,
    "checkpoint.keep_every": at_least(0, " (0: none)"),
    "checkpoint.every_minutes": at_least(0, " (0: off)"),
    "checkpoint.resume": Rule(lambda v: v in ("auto", "never") or bool(re.match(r"^step_\d+$", str(v))),
                              "auto, never or step_N (a checkpoint's directory name, e.g. step_0000600)"),
    "eval.mode": one_of("inline", "external", "none"),
    "eval.batch_size": POSITIVE,
    "eval.fewshot.train": location(),
    "eval.fewshot.test": location(),
    "eval.fewshot.shots": values(above(0)),
    "eval.fewshot.seeds": POSITIVE,
    "eval.fewshot.l2_regs": values(above(0)),
    "eval.linear_probe.train": location(),
    "eval.linear_probe.test": location(),
    "eval.linear_probe.l2_regs": values(above(0)),
    "eval.finetune.train": location(),
    "eval.finetune.test": location(),
    "eval.finetune.num_classes": at_least(0, " (0: from the manifest)"),
    "eval.finetune.steps": POSITIVE,
    "eval.finetune.batch_size": POSITIVE,
    "eval.finetune.lr": POSITIVE,
    "eval.finetune.warmup_steps": COUNT,
    "eval.finetune.image_size": at_least(0, " (0: data.image_size)"),
    "eval.finetune.time_budget_s": at_least(0, " (0: no limit)"),
}


# The engines with options of their own: engine.<kind> holds them.
ENGINE_OPTIONS: dict[str, type[DeepSpeedOptions] | type[FSDPOptions]] = {
    "deepspeed": DeepSpeedOptions,
    "fsdp": FSDPOptions,
}


def engine_options(engine: DictConfig) -> DeepSpeedOptions | FSDPOptions | None:
    """The typed options of `engine.kind`, from its section engine.<kind> (None: the engine takes none)."""
    options = ENGINE_OPTIONS.get(engine.kind)
    return options(**{f.name: engine[engine.kind][f.name] for f in fields(options)}) if options else None


def _expand(cfg: DictConfig, pattern: str) -> list[str]:
    """`pattern` with each `*` replaced by every index of the list it stands for."""
    if "*" not in pattern:
        return [pattern]
    head, tail = pattern.split(".*.", 1)
    return [k for i in range(len(OmegaConf.select(cfg, head) or [])) for k in _expand(cfg, f"{head}.{i}.{tail}")]


def validate(cfg: DictConfig, blame: Callable[[str], str]) -> None:
    """Every rule of RULES and the few that tie keys together; the first failure is a ConfigError
    naming the key, its value, `blame(key)` (the file or the command line that set it), what is allowed."""
    for pattern, rule in RULES.items():
        for key in _expand(cfg, pattern):
            value = OmegaConf.select(cfg, key)
            if not rule.ok(value):
                raise ConfigError(f"{blame(key)}: {rule.message(key, value)}")
    if cfg.model.img_size is not None and cfg.model.img_size != cfg.data.image_size:
        def origin(key: str) -> str:
            return "the command line" if blame(key) == "command line" else blame(key)
        raise ConfigError(f"'model.img_size' is {cfg.model.img_size} (from {origin('model.img_size')}) but "
                          f"'data.image_size' is {cfg.data.image_size} (from {origin('data.image_size')}): the "
                          "model is built at the data's resolution; set data.image_size alone (model.img_size: "
                          "null follows it)")
    if not cfg.data.sources and not cfg.data.train:
        raise ConfigError(f"{blame('data.train')}: 'data.train' is empty and 'data.sources' has no entry; "
                          "give the training shards in one of them")
    for task in ("fewshot", "linear_probe", "finetune"):
        section = cfg.eval[task]
        if section.enabled and not (section.train and section.test):
            raise ConfigError(f"{blame(f'eval.{task}.enabled')}: 'eval.{task}.enabled' needs "
                              f"'eval.{task}.train' and 'eval.{task}.test'")


def upgrade_saved_config(text: str) -> str:
    """A run's saved config.yaml with keys that have moved since (MOVED_KEYS) put where they live now,
    so that runs trained before a move can still be evaluated and exported."""
    node = OmegaConf.create(text)
    if not isinstance(node, DictConfig):
        return text
    changed = False
    for old, new in MOVED_KEYS.items():
        section, _, leaf = old.rpartition(".")
        parent = OmegaConf.select(node, section)
        if isinstance(parent, DictConfig) and leaf in parent:
            value = parent.pop(leaf)
            if OmegaConf.select(node, new, default=_UNSET) is _UNSET:
                OmegaConf.update(node, new, value, force_add=True)
            changed = True
    return OmegaConf.to_yaml(node) if changed else text


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
