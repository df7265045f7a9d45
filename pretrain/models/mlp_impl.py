"""Choose how the Mixer MLPs run: ``eager`` | ``compile`` | ``fused`` (config ``model.mlp_impl``)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .fused_mlp import fused_unavailable_reason, use_fused_mlp
from .mixer import MixerBlock, activation_name

MLP_IMPLS = ("eager", "compile", "fused")


def apply_mlp_impl(model: nn.Module, impl: str, **compile_options: Any) -> nn.Module:
    """Apply ``impl`` to ``model`` in place and return it. State-dict keys never change.

    ``compile_options`` go to ``torch.compile`` for ``compile`` (e.g. ``mode="max-autotune"``).

    * ``eager``: as built.
    * ``compile``: regional ``torch.compile``, one compiled region per repeated block (MixerBlock,
      or ConvMixer's blocks): every block shares one graph, so compile time does not grow with depth.
    * ``fused``: the Triton MLPs of ``fused_mlp``, with each residual add fused into the LayerNorm
      that reads it. Without Triton or CUDA this falls back to eager with one warning saying why,
      so a config written for the cluster still runs on a laptop.
    """
    if impl not in MLP_IMPLS:
        raise ValueError(f"mlp_impl must be one of {', '.join(MLP_IMPLS)}, got {impl!r}")
    if impl == "compile":
        blocks = _repeated_blocks(model)
        if not blocks:
            raise ValueError(f"mlp_impl 'compile': {type(model).__name__} has no repeated blocks to compile")
        for block in blocks:
            block.compile(**compile_options)  # in place: parameter names stay free of torch.compile's _orig_mod prefix
    elif impl == "fused":
        # The Triton epilogues compute exact (erf) GELU only: a gelu_tanh model (model.act) runs eager,
        # said here once rather than found out from a profile. Checked first: it holds on any machine.
        act = activation_name(model)
        reason = (f"the Triton MLP kernels compute exact gelu, the model uses {act}"
                  if act != "gelu" and any(isinstance(m, MixerBlock) for m in model.modules())
                  else fused_unavailable_reason())
        if reason is None and not any(isinstance(m, MixerBlock) for m in model.modules()):
            reason = f"{type(model).__name__} has no Mixer MLPs"
        if reason is not None:
            warnings.warn(f"mlp_impl 'fused' falls back to eager: {reason}", RuntimeWarning, stacklevel=2)
        else:
            use_fused_mlp(model)
    return model


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.Sequential) else []
