"""Evaluators by name: each evaluator module registers the builder that makes it from its config section.

A task is a section ``eval.<name>`` of the config, switched on with its ``enabled`` flag, plus the builder
registered here under the same name; ``build.build_evaluators`` walks the sections in config order and
calls the builder of each enabled one. A new evaluator is a module holding the evaluator and its
``@register("<name>")`` builder (imported in ``__init__``) and a section dataclass in ``pretrain/config.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator

from omegaconf import DictConfig

from data_pipeline.image.transforms import EvalTransform

from ..dist import DistInfo
from .features import FeatureCache
from .runner import Autocast, Batches, ToDevice

if TYPE_CHECKING:
    from data_pipeline.stream.batch import Batch

    from .runner import Evaluator


@dataclass
class EvalContext:
    """What a builder may use besides its own section; built once per set of evaluators (build.py)."""

    cfg: DictConfig  # the whole config (data.val, data.image_size, model.num_classes, train.seed, ...)
    dist: DistInfo
    to_device: ToDevice  # host batch -> normalised device inputs; evaluation never mixes
    autocast: Autocast  # the training engine's, or one for train.precision outside training
    read: Callable[..., Iterator[Batch]]  # eval_batches bound to eval.batch_size and the storage settings
    manifest_classes: Callable[[str, str], int]  # (manifest spec, config key naming it) -> its num_classes
    features: FeatureCache = field(default_factory=FeatureCache)  # evaluators on one split share a forward pass

    def transform(self, image_size: int = 0) -> EvalTransform:
        """The eval crop at ``image_size`` (0: ``data.image_size``)."""
        d = self.cfg.data
        return EvalTransform(image_size or d.image_size, crop_fraction=d.crop_fraction, max_pixels=d.max_image_pixels)

    def rank_share(self, spec: str, num_classes: int | None = None) -> Batches:
        """This rank's share of the shards of ``spec``: for data-parallel metrics and features. ``num_classes``:
        labels at or above it are skipped, as unparseable ones always are (never a crash in the metric)."""
        return partial(self.read, spec, transform=self.transform(), rank=self.dist.rank,
                       world_size=self.dist.world_size, num_classes=num_classes)

    def whole(self, spec: str, image_size: int = 0, num_classes: int | None = None) -> Batches:
        """Every shard of ``spec``: for an evaluator that runs on rank 0 alone."""
        return partial(self.read, spec, transform=self.transform(image_size), num_classes=num_classes)


# (its eval.<name> section, the context) -> the evaluator, or None when it has nothing to evaluate
Builder = Callable[[DictConfig, EvalContext], "Evaluator | None"]
EVALUATORS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder`` makes the evaluator of the config section ``eval.<name>``."""
    def add(builder: Builder) -> Builder:
        if name in EVALUATORS:
            raise ValueError(f"evaluator {name!r} is registered twice")
        EVALUATORS[name] = builder
        return builder
    return add
