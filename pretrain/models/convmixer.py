"""ConvMixer (Trockman & Kolter, "Patches Are All You Need?", 2022): the isotropic conv baseline.

A patch-embedding conv stem, then ``depth`` blocks of a residual depthwise conv and a pointwise
(1x1) conv, each followed by activation and BatchNorm; global average pooling and a linear head.
It keeps one resolution throughout, like Mixer, and serves as the comparison family.

Parameter names follow timm's ``convmixer`` (``stem.0``, ``blocks.N.0.fn.0``, ``blocks.N.1``, ``head``)
so timm weights load without renaming. Like ``mixer.py`` this imports only torch.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from .mixer import DropPath, zero_head

__all__ = ["ConvMixer", "CONVMIXER_CFGS"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Residual(nn.Module):
    """``x + drop_path(fn(x))``; the attribute is ``fn`` as in timm, so keys read ``blocks.N.0.fn.K``."""

    def __init__(self, fn: nn.Module, drop_path: float = 0.0) -> None:
        super().__init__()
        self.fn = fn
        self.drop_path = DropPath(drop_path)  # no parameters, so timm's keys are unaffected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.fn(x))


class ConvMixerStem(nn.Sequential):
    """Patch conv -> act -> BatchNorm. Remembers the nominal image size (for FLOPs and config checks)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, act: type[nn.Module], img_size: int) -> None:
        super().__init__(nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size), act(),
                         nn.BatchNorm2d(dim))
        self.img_size = (img_size, img_size)


class ConvMixer(nn.Module):
    """ConvMixer-``dim``/``depth`` with depthwise ``kernel_size`` and patch ``patch_size``.

    Any input size works (the convs do not care); ``img_size`` is the nominal training size used
    for ``flops_per_image`` and the config check.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        act: str = "gelu",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        if dim < 1 or depth < 1 or num_classes < 0 or kernel_size < 1 or patch_size < 1:
            raise ValueError(f"need dim, depth, kernel_size, patch_size >= 1 and num_classes >= 0; got "
                             f"{dim}, {depth}, {kernel_size}, {patch_size}, {num_classes}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        act_layer = _ACTIVATIONS[act]
        # Not in the ConvMixer paper; offered so that one config can regularise either family alike.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.num_classes = num_classes
        self.num_features = dim
        self.grad_checkpointing = False
        self.stem = ConvMixerStem(in_chans, dim, patch_size, act_layer, img_size)
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                Residual(nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), act_layer(), nn.BatchNorm2d(dim)),
                    drop_path=dpr[i]),
                nn.Conv2d(dim, dim, kernel_size=1), act_layer(), nn.BatchNorm2d(dim),
            )
            for i in range(depth)
        ])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh zero-initialised head for transfer (identity if ``num_classes == 0``)."""
        self.num_classes = num_classes
        self.head = zero_head(self.num_features, num_classes, like=self.stem[0].weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C_in, H, W] -> feature map [B, dim, H/p, W/p]."""
        x = self.stem(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def flops_per_image(self) -> int:
        """Forward FLOPs at ``img_size``: 2 x multiply-accumulates of every conv and the head."""
        conv = self.stem[0]
        tokens = (self.stem.img_size[0] // conv.stride[0]) * (self.stem.img_size[1] // conv.stride[1])
        dim = self.num_features
        macs = tokens * dim * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        for block in self.blocks:
            depthwise = block[0].fn[0]
            macs += tokens * dim * depthwise.kernel_size[0] * depthwise.kernel_size[1]  # one input channel each
            macs += tokens * dim * dim  # pointwise
        if isinstance(self.head, nn.Linear):
            macs += self.head.in_features * self.head.out_features
        return 2 * macs


# Published sizes (the paper's Table 1 and timm's registered variants): dim/depth, kernel, patch, act.
CONVMIXER_CFGS: dict[str, dict] = {
    "convmixer_1536_20": dict(dim=1536, depth=20, kernel_size=9, patch_size=7),  # 51.6M, 81.4 % top-1
    "convmixer_768_32": dict(dim=768, depth=32, kernel_size=7, patch_size=7, act="relu"),  # 21.1M, 80.2 %
    "convmixer_1024_20_ks9_p14": dict(dim=1024, depth=20, kernel_size=9, patch_size=14),  # 24.4M, 76.9 %
    "convmixer_1024_16": dict(dim=1024, depth=16, kernel_size=9, patch_size=7),  # 19.4M
    "convmixer_512_16": dict(dim=512, depth=16, kernel_size=8, patch_size=7),  # 5.4M
    # CPU-sized, for tests and the demo: 32 px, patch 4.
    "convmixer_t4_32": dict(dim=128, depth=4, kernel_size=5, patch_size=4, img_size=32),
}
