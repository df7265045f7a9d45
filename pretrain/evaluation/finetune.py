"""Fine-tune transfer: a short full fine-tune with a new head, then top-1 on the test split.

The paper's recipe scaled down: SGD with momentum 0.9, no weight decay, gradient clipping at
global norm 1, linear warm-up then cosine decay, random crop + (optional) flip; the head is replaced
through the model's own `reset_classifier` (zero-initialised). The pre-trained model is copied, never
changed; at another resolution (`eval.finetune.image_size`) the copy gets the paper's resized
token-mixing weights. Runs on rank 0 (downstream sets are small); the train split is held in memory
as uint8.
"""
from __future__ import annotations

import copy
import time
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from data_pipeline.stream.batch import Batch

from ..dist import DistInfo
from ..optim import lr_factor
from .registry import EvalContext, register
from .runner import Autocast, Batches, ToDevice


class EvalTimeout(RuntimeError):
    """An evaluation ran past its time budget; recorded as that task's error."""


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int, hflip: bool) -> torch.Tensor:
    """uint8 NHWC: pad by reflection, take a random crop of the original size, flip half (if hflip)."""
    n, h, w, _ = images.shape
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    out = padded[torch.arange(n)[:, None, None], :, rows, cols]  # (n, h, w, c)
    return out.round().to(torch.uint8)


def transfer_copy(model: nn.Module, image_hw: tuple[int, int]) -> nn.Module:
    """A copy of ``model`` for images of ``image_hw``: a Mixer at another resolution gets the paper's
    block-diagonal token-mixing weights (pretrain.models.resolution); anything else is copied as is."""
    from ..models.mixer import MlpMixer
    from ..models.resolution import at_resolution

    if isinstance(model, MlpMixer) and tuple(model.stem.img_size) != tuple(image_hw):
        try:
            return at_resolution(model, tuple(image_hw))
        except ValueError as e:
            raise ValueError(f"finetune at {tuple(image_hw)} px: {e}") from None
    return copy.deepcopy(model)


class FineTuneEvaluator:
    name = "finetune"

    def __init__(self, train_batches: Batches, test_batches: Batches, to_device: ToDevice, autocast: Autocast,
                 num_classes: int, steps: int, batch_size: int, lr: float, warmup_steps: int, hflip: bool,
                 dist_info: DistInfo, seed: int = 0, time_budget_s: float = 0.0) -> None:
        self.train_batches, self.test_batches = train_batches, test_batches
        self.to_device, self.autocast = to_device, autocast
        self.num_classes, self.steps, self.batch_size, self.lr = num_classes, steps, batch_size, lr
        self.warmup_steps, self.hflip, self.dist, self.seed = warmup_steps, hflip, dist_info, seed
        self.time_budget_s = time_budget_s  # 0: no limit

    def _lr(self, step: int) -> float:
        return self.lr * lr_factor(step, self.steps, self.warmup_steps, "cosine")

    def run(self, model: nn.Module) -> dict[str, float]:
        if not self.dist.is_main:
            return {}
        start = time.perf_counter()
        batches = list(self.train_batches())
        images = torch.cat([b.images for b in batches])
        labels = torch.cat([b.labels for b in batches])
        if labels.numel() == 0:
            raise ValueError("finetune: the train split is empty")
        if int(labels.max()) >= self.num_classes:
            raise ValueError(f"finetune: label {int(labels.max())} >= eval.finetune.num_classes={self.num_classes}")
        tuned = transfer_copy(model, images.shape[1:3])
        tuned.reset_classifier(self.num_classes)
        tuned.train()
        opt = torch.optim.SGD(tuned.parameters(), lr=self.lr, momentum=0.9)
        gen = torch.Generator().manual_seed(self.seed)
        for step in range(self.steps):
            if self.time_budget_s and time.perf_counter() - start > self.time_budget_s:
                raise EvalTimeout(f"finetune: time budget of {self.time_budget_s:g} s used up after "
                                  f"{step} of {self.steps} steps")
            idx = torch.randint(0, len(labels), (self.batch_size,), generator=gen)
            batch = Batch(images=random_crop_flip(images[idx], gen, pad=max(1, images.shape[1] // 8),
                                                  hflip=self.hflip), labels=labels[idx], keys=[])
            x, y = self.to_device(batch)
            for group in opt.param_groups:
                group["lr"] = self._lr(step)
            with self.autocast():
                loss = F.cross_entropy(tuned(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
            opt.step()
        tuned.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in self.test_batches():
                x, y = self.to_device(batch)
                with self.autocast():
                    correct += int((tuned(x).argmax(1) == y).sum())
                total += len(y)
        return {"top1": correct / max(1, total), "final_train_loss": float(loss.detach())}


@register("finetune")
def build_finetune(section: DictConfig, ctx: EvalContext) -> FineTuneEvaluator:
    """Rank 0 fine-tunes alone, so it reads whole splits."""
    classes = section.num_classes or ctx.manifest_classes(section.train, "eval.finetune.train")
    return FineTuneEvaluator(
        ctx.whole(section.train, section.image_size, classes), ctx.whole(section.test, section.image_size, classes),
        ctx.to_device, ctx.autocast, num_classes=classes,
        steps=section.steps, batch_size=section.batch_size, lr=section.lr, warmup_steps=section.warmup_steps,
        hflip=section.hflip, dist_info=ctx.dist, seed=ctx.cfg.train.seed, time_budget_s=section.time_budget_s)
