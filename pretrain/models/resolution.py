"""Fine-tune a Mixer at a higher resolution: the paper's block-diagonal token-mixing weights.

Mixer has no position embeddings, but its token-mixing MLPs are sized for one patch grid. The
paper (Tolstikhin et al. 2021, Appendix C) keeps the patch size, so a resolution K times larger
gives K^2 times the tokens, and replaces each token-mixing weight by a block-diagonal matrix
with K^2 copies of the pre-trained one: the tokens are split into K^2 groups, each mixed by its
own copy (initialised identical, free to diverge while fine-tuning). The hidden width D_S grows
by K^2 too.

Here the groups are the K_h x K_w non-overlapping windows of the original grid's shape, so the
token at position (i, j) of a window meets the weights of position (i, j) of the original grid,
and every window is treated exactly as a whole image was in pre-training. At initialisation the
resized model's logits for an image tiled from K^2 pictures equal the mean of the original
model's logits for those pictures (tested).

A grid that is not an integer multiple of the original (224 -> 384 with patch 16: 14 -> 24) has
no such construction, and neither has a smaller one; those raise a one-line error rather than
interpolating weights that have no spatial layout to interpolate.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .mixer import MlpMixer, _pair

__all__ = ["resize_token_mixing", "at_resolution"]


def _factors(old: tuple[int, int], new: tuple[int, int]) -> tuple[int, int]:
    if new[0] < old[0] or new[1] < old[1] or new[0] % old[0] or new[1] % old[1]:
        raise ValueError(
            f"cannot resize token mixing from a {old[0]}x{old[1]} to a {new[0]}x{new[1]} patch grid: the "
            f"paper's block-diagonal resize needs the new grid to be an integer multiple of the old one "
            f"(e.g. {2 * old[0]}x{2 * old[1]}); there is no principled way otherwise")
    return new[0] // old[0], new[1] // old[1]


def _window_index(old: tuple[int, int], new: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of the new grid (row-major): its window and its position inside the window."""
    (h, w), (_, new_w) = old, new
    kw = new_w // w
    rows, cols = torch.meshgrid(torch.arange(new[0]), torch.arange(new[1]), indexing="ij")
    window = (rows // h) * kw + cols // w
    local = (rows % h) * w + cols % w
    return window.flatten(), local.flatten()


def resize_token_mixing(state_dict: Mapping[str, torch.Tensor], old_grid: tuple[int, int],
                        new_grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with every ``mlp_tokens`` weight made block-diagonal for ``new_grid``."""
    kh, kw = _factors(old_grid, new_grid)
    groups = kh * kw
    window, local = _window_index(old_grid, new_grid)
    n_new = window.numel()
    cols = torch.arange(n_new)
    out = dict(state_dict)
    for key, value in state_dict.items():
        if ".mlp_tokens.fc1." in key and key.endswith("weight"):  # [D_S, N] -> [G*D_S, G*N]
            d_s = value.shape[0]
            w1 = value.new_zeros(groups, d_s, n_new)
            w1[window, :, cols] = value[:, local].t()
            out[key] = w1.reshape(groups * d_s, n_new)
        elif ".mlp_tokens.fc1." in key:  # bias [D_S] -> [G*D_S]
            out[key] = value.repeat(groups)
        elif ".mlp_tokens.fc2." in key and key.endswith("weight"):  # [N, D_S] -> [G*N, G*D_S]
            d_s = value.shape[1]
            w2 = value.new_zeros(n_new, groups, d_s)
            w2[cols, window, :] = value[local, :]
            out[key] = w2.reshape(n_new, groups * d_s)
        elif ".mlp_tokens.fc2." in key:  # bias [N] -> [G*N]
            out[key] = value[local].clone()
    return out


def at_resolution(model: MlpMixer, img_size: int | tuple[int, int]) -> MlpMixer:
    """A new Mixer for ``img_size`` (same patch size) initialised from ``model`` as the paper does."""
    patch = model.stem.proj.kernel_size
    new_img = _pair(img_size, "img_size")
    if new_img[0] % patch[0] or new_img[1] % patch[1]:
        raise ValueError(f"img_size {new_img} is not divisible by patch_size {tuple(patch)}")
    old_grid = model.stem.grid_size
    new_grid = (new_img[0] // patch[0], new_img[1] // patch[1])
    kh, kw = _factors(old_grid, new_grid)
    block = model.blocks[0]
    d_s, d_c = block.mlp_tokens.fc1.out_features, block.mlp_channels.fc1.out_features
    dim = model.embed_dim
    kwargs = {**model.init_kwargs, "img_size": new_img, "mlp_ratio": (kh * kw * d_s / dim, d_c / dim)}
    ref = model.norm.weight
    with torch.device(ref.device):
        resized = MlpMixer(**kwargs).to(ref.dtype)
    if resized.blocks[0].mlp_tokens.fc1.out_features != kh * kw * d_s:  # int() rounding of the ratio
        raise ValueError(f"cannot express a token hidden width of {kh * kw * d_s} for width {dim}")
    resized.load_state_dict(resize_token_mixing(model.state_dict(), old_grid, new_grid))
    return resized
