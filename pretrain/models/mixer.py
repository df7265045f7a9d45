"""MLP-Mixer (Tolstikhin et al. 2021, arXiv 2105.01601) as plain torch modules.

Parameter names follow timm's ``mlp_mixer`` (``stem.proj``, ``blocks.N.norm1``,
``blocks.N.mlp_tokens.fc1``, ..., ``norm``, ``head``) so state dicts load in either
direction without renaming. This module imports only torch: devices, distribution and
configuration are the caller's business.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence, Union

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["activation_name", "DropPath", "Mlp", "TokenMixingMlp", "MixerBlock", "PatchEmbed", "MlpMixer", "MODEL_CFGS"]

IntOrPair = Union[int, Sequence[int]]

# Standard deviation of a unit normal truncated to (-2, 2). Dividing by it makes a
# truncated normal have the requested std, as JAX's variance_scaling("truncated_normal") does.
_TRUNC_NORMAL_STD_CORRECTION = 0.87962566103423978

# "gelu" is exact (erf): PyTorch's and timm's default, and what timm's Mixer ports run.
# "gelu_tanh" is the tanh approximation: the paper's JAX code (vision_transformer models_mixer.py,
# big_vision mlp_mixer.py) calls flax's nn.gelu, i.e. jax.nn.gelu(approximate=True), so the
# official checkpoints were trained with it and reproduce their logits only with it.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": partial(nn.GELU, approximate="none"),
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
}


def activation_name(model: nn.Module) -> str | None:
    """The activation a model's MLPs use ("gelu", "gelu_tanh", "relu"), from its first activation
    module; None when it has none. Works on wrapped and fused models alike (modules, not kwargs)."""
    for module in model.modules():
        if isinstance(module, nn.GELU):
            return "gelu_tanh" if module.approximate == "tanh" else "gelu"
        if isinstance(module, nn.ReLU):
            return "relu"
    return None
_GLOBAL_POOLS = ("avg", "")


def _pair(value: IntOrPair, name: str) -> tuple[int, int]:
    """Return ``(h, w)`` from an int or a 2-sequence of ints."""
    if isinstance(value, int):
        return value, value
    pair = tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair[0], pair[1]


def lecun_normal_(tensor: torch.Tensor) -> torch.Tensor:
    """LeCun normal init: truncated normal (+-2 std) with variance 1 / fan_in, like JAX's."""
    fan_in = tensor[0].numel() if tensor.dim() > 1 else tensor.numel()
    std = math.sqrt(1.0 / fan_in) / _TRUNC_NORMAL_STD_CORRECTION
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, scaling survivors by 1/keep.

    Identity in eval mode or when ``drop_prob == 0``.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            # p == 1 would divide by a zero keep probability.
            raise ValueError(f"drop_path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # One Bernoulli draw per sample, broadcast over all other dims.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Two-layer MLP ``fc1 -> act -> drop1 -> fc2 -> drop2`` (timm naming)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class TokenMixingMlp(Mlp):
    """The token-mixing MLP: an ``Mlp`` over the token axis of [B, N, C] activations.

    Same parameters and names as ``Mlp``; taking [B, N, C] itself (rather than the caller
    transposing) lets the fused implementation mix tokens without materialising a transpose.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, N, C] -> [B, N, C], mixing along N."""
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class MixerBlock(nn.Module):
    """One Mixer layer: a token-mixing MLP then a channel-mixing MLP, each pre-norm + residual.

    ``mlp_ratio = (r_tokens, r_channels)`` sets the hidden widths as multiples of ``dim``:
    D_S = int(r_tokens * dim), D_C = int(r_channels * dim). (0.5, 4.0) gives the paper's Table 1.
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float | Sequence[float] = (0.5, 4.0),
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        ratios = (mlp_ratio, mlp_ratio) if isinstance(mlp_ratio, (int, float)) else tuple(mlp_ratio)
        if len(ratios) != 2:
            raise ValueError(f"mlp_ratio must be a number or a pair (tokens, channels), got {mlp_ratio!r}")
        tokens_dim, channels_dim = int(ratios[0] * dim), int(ratios[1] * dim)
        self.norm1 = norm_layer(dim)
        # Token mixing acts along the sequence axis: in/out features are the token count.
        self.mlp_tokens = TokenMixingMlp(seq_len, tokens_dim, act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp_channels = Mlp(dim, channels_dim, act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, N, C] -> [B, N, C]."""
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x)))
        x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one Conv2d (kernel = stride = patch)."""

    def __init__(self, img_size: tuple[int, int], patch_size: tuple[int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, C_in, H, W] -> [B, N, C]."""
        # The token-mixing MLPs are sized for one token count, so any other input size would
        # fail later with an opaque matmul error; say so here instead.
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} != model img_size {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


def zero_head(num_features: int, num_classes: int, like: torch.Tensor) -> nn.Module:
    """A zero-initialised linear head (the paper's choice, also for transfer), or identity for 0 classes.
    Built on ``like``'s device and dtype, so a reset after .to(device) needs no second move."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(num_features, num_classes, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return head


class MlpMixer(nn.Module):
    """MLP-Mixer classifier with timm's module names and model surface.

    Args:
        num_classes: classifier outputs; 0 gives an identity head (features only).
        img_size, patch_size: int or (h, w); img_size must be divisible by patch_size.
        num_blocks, embed_dim, mlp_ratio: depth, width C and (D_S/C, D_C/C).
        drop_rate: dropout before the head. proj_drop_rate: dropout inside the MLPs.
        drop_path_rate: stochastic depth of the last block; rates rise linearly from 0.
        global_pool: "avg" (mean over tokens) or "" (head applied per token).
        act: "gelu" (exact erf; timm's ports) or "gelu_tanh" (flax's nn.gelu: the official JAX checkpoints).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        img_size: IntOrPair = 224,
        in_chans: int = 3,
        patch_size: IntOrPair = 16,
        num_blocks: int = 8,
        embed_dim: int = 512,
        mlp_ratio: float | Sequence[float] = (0.5, 4.0),
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        act: str = "gelu",
    ) -> None:
        super().__init__()
        img_hw, patch_hw = _pair(img_size, "img_size"), _pair(patch_size, "patch_size")
        if img_hw[0] % patch_hw[0] or img_hw[1] % patch_hw[1]:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if act not in _ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        if global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}")
        if num_blocks < 1 or embed_dim < 1 or num_classes < 0:
            raise ValueError(
                f"need num_blocks >= 1, embed_dim >= 1, num_classes >= 0; "
                f"got {num_blocks}, {embed_dim}, {num_classes}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")

        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.global_pool = global_pool
        self.grad_checkpointing = False
        # The constructor arguments, so a variant of this model (new resolution) can be built.
        self.init_kwargs = dict(
            num_classes=num_classes, img_size=img_hw, in_chans=in_chans, patch_size=patch_hw, num_blocks=num_blocks,
            embed_dim=embed_dim, mlp_ratio=mlp_ratio, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
            drop_path_rate=drop_path_rate, global_pool=global_pool, act=act)

        self.stem = PatchEmbed(img_hw, patch_hw, in_chans, embed_dim)
        self.num_tokens = self.stem.num_patches
        act_layer = _ACTIVATIONS[act]
        # Stochastic depth rises linearly with depth (0 for the first block), as in DeiT/big_vision.
        dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        self.blocks = nn.Sequential(
            *[
                MixerBlock(
                    embed_dim, self.num_tokens, mlp_ratio, act_layer=act_layer, drop=proj_drop_rate, drop_path=dpr[i]
                )
                for i in range(num_blocks)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)  # no parameters, so timm's keys are unaffected
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ----------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Paper / big_vision init: lecun-normal stem, xavier MLPs with tiny biases, zero head."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name == "head":
                    # A zero head starts every class at equal logits, so the first steps
                    # do not fight a random classifier.
                    nn.init.zeros_(module.weight)
                    nn.init.zeros_(module.bias)
                else:
                    nn.init.xavier_uniform_(module.weight)
                    # big_vision's Mixer MLPs use normal(1e-6) biases rather than zeros.
                    nn.init.normal_(module.bias, std=1e-6)
            elif isinstance(module, nn.Conv2d):
                lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------- surface
    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (stem, each block, final norm) for layer-wise LR decay."""
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh zero-initialised one (identity if ``num_classes == 0``)."""
        if global_pool is not None:
            if global_pool not in _GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = zero_head(self.num_features, num_classes, like=self.norm.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C_in, H, W] -> normalised tokens [B, N, C]."""
        x = self.stem(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                # Non-reentrant: works with inputs that do not require grad and with torch.compile;
                # RNG state is restored on recompute, so dropout/drop-path masks match.
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens [B, N, C] -> logits [B, K] (or pooled features [B, C] if ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --------------------------------------------------------------------------- costs
    def flops_per_image(self) -> int:
        """Forward FLOPs for one image: 2 x multiply-accumulates of the stem conv and every Linear.

        Norms, activations, residual adds, pooling and bias adds are ignored (they are a few
        percent at most). Training costs about 3x this (forward + backward for inputs and weights).
        """
        n, c = self.num_tokens, self.embed_dim
        conv = self.stem.proj
        macs = n * c * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        for block in self.blocks:
            d_s = block.mlp_tokens.fc1.out_features
            d_c = block.mlp_channels.fc1.out_features
            macs += c * (n * d_s + d_s * n)  # token MLP: N -> D_S -> N, once per channel
            macs += n * (c * d_c + d_c * c)  # channel MLP: C -> D_C -> C, once per token
        if isinstance(self.head, nn.Linear):
            rows = 1 if self.global_pool == "avg" else n
            macs += rows * self.head.in_features * self.head.out_features
        return 2 * macs


# Registered variants: constructor arguments per timm name. Sizes are the paper's Table 1
# (patch P, blocks L, width C; D_S = C/2 and D_C = 4C come from the default mlp_ratio).
MODEL_CFGS: dict[str, dict] = {
    "mixer_s32_224": dict(img_size=224, patch_size=32, num_blocks=8, embed_dim=512),
    "mixer_s16_224": dict(img_size=224, patch_size=16, num_blocks=8, embed_dim=512),
    "mixer_b32_224": dict(img_size=224, patch_size=32, num_blocks=12, embed_dim=768),
    "mixer_b16_224": dict(img_size=224, patch_size=16, num_blocks=12, embed_dim=768),
    "mixer_l32_224": dict(img_size=224, patch_size=32, num_blocks=24, embed_dim=1024),
    "mixer_l16_224": dict(img_size=224, patch_size=16, num_blocks=24, embed_dim=1024),
    "mixer_h14_224": dict(img_size=224, patch_size=14, num_blocks=32, embed_dim=1280),
    # CPU-sized: 32 px, patch 4 -> 64 tokens. t4 is the demo model, p4 the test model.
    "mixer_t4_32": dict(img_size=32, patch_size=4, num_blocks=4, embed_dim=128),
    "mixer_p4_32": dict(img_size=32, patch_size=4, num_blocks=2, embed_dim=64),
}
