"""The fused mixed-precision Mixer MLPs (``model.mlp_impl: fused``).

Forward per MLP, in bf16/fp16 with fp32 accumulation (see ``triton_kernels``):

* fc1 as one Triton matmul whose epilogue adds the bias and applies GELU; it writes the
  pre-activation (kept for backward) and the activation (consumed by fc2, then freed);
* fc2 as one Triton matmul with the bias in its epilogue;
* token mixing as ``W @ x[b]`` on the ``[B, N, C]`` activations through strides: no transposes.

Backward recomputes GELU from the saved pre-activation inside the kernel that forms
``dL/dpre = (dL/dout @ W2) * gelu'(pre)``; the remaining weight/input gradients are plain GEMMs
and reductions left to cuBLAS through torch.

Residual adds are fused into the LayerNorm that reads them (``fused_layernorm``): in
``MlpMixer`` each block's token-mixing residual add + ``norm2`` is one kernel, and its
channel-mixing residual add is handed on unadded (a ``PendingResidual``) to be fused with the
next block's ``norm1``, or with the model's final ``norm`` after the last block. Each norm runs
inside the module that owns its parameters, so per-block sharding (FSDP gathers one block's
parameters around its forward) and per-block activation checkpointing still see whole blocks;
a checkpointed block boundary then keeps two tensors (stream and branch) instead of their sum.
``use_fused_mlp(model, fuse_layernorm=False)`` leaves the norms eager, for comparison. The LayerNorm
fusion is checked for correctness only: whether it pays on a GPU is unmeasured
(``bench/model_throughput.py --impl fused fused_noln``).

The fused modules keep the eager modules' parameters (same objects, same names: ``fc1``/``fc2``,
``norm1``/``norm2``/``norm``), so checkpoints, optimisers and engines do not notice the swap. They
run the eager code whenever fusing does not apply: fp32 math, dropout inside the MLP while
training, tanh-GELU, or a device Triton cannot run on.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, NamedTuple, Union

import torch
from torch import nn

from .fused_layernorm import fused_add_layernorm
from .mixer import MixerBlock, MlpMixer, Mlp, TokenMixingMlp
from .triton_mode import interpreting

__all__ = ["fused_unavailable_reason", "use_fused_mlp", "FusedMlp", "FusedTokenMixingMlp",
           "FusedMixerBlock", "FusedLayerNorm", "PendingResidual", "fused_channel_mlp", "fused_token_mlp"]

_FUSED_DTYPES = (torch.bfloat16, torch.float16)


def fused_unavailable_reason() -> str | None:
    """Why the Triton path cannot run in this process, or None if it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA device (and TRITON_INTERPRET is not set)"
    try:
        for module in ("triton_kernels", "triton_layernorm"):
            importlib.import_module(f".{module}", __package__)
    except Exception as e:  # a Triton that does not match this torch/driver
        return f"triton cannot be imported: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _kernels():
    from . import triton_kernels

    return triton_kernels


# ------------------------------------------------------------------------- autograd functions
class _ChannelMlpFn(torch.autograd.Function):
    """``gelu(x @ W1^T + b1) @ W2^T + b2`` over the last axis of a contiguous x [..., C]."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        k = _kernels()
        lead = x.shape[:-1]
        act, pre = k.fused_matmul(x.view(1, -1, x.shape[-1]), w1.t()[None], b1, k.BIAS_COL, k.EPI_GELU)
        out, _ = k.fused_matmul(act, w2.t()[None], b2, k.BIAS_COL,
                                out_shape=(*lead, w2.shape[0]))  # allocated in x's shape: not a view
        ctx.save_for_backward(x, w1, w2, pre)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        k = _kernels()
        x, w1, w2, pre = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        d_pre, act = k.fused_matmul(g[None], w2[None], epilogue=k.EPI_DGELU, aux=pre)
        d_pre, act = d_pre[0], act[0]
        x2 = x.view(-1, x.shape[-1])
        grad_w2 = g.t() @ act
        grad_b2 = g.sum(0, dtype=torch.float32).to(g.dtype)
        grad_w1 = d_pre.t() @ x2
        grad_b1 = d_pre.sum(0, dtype=torch.float32).to(g.dtype)
        grad_x = (d_pre @ w1).view(x.shape)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


class _TokenMlpFn(torch.autograd.Function):
    """Token mixing on x [B, N, C]: ``out[b] = W2 @ gelu(W1 @ x[b] + b1) + b2`` (biases per row)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        k = _kernels()
        batch = x.shape[0]
        # expand(): the shared weight gets batch stride 0, read once per tile, never copied.
        act, pre = k.fused_matmul(w1.expand(batch, *w1.shape), x, b1, k.BIAS_ROW, k.EPI_GELU)
        out, _ = k.fused_matmul(w2.expand(batch, *w2.shape), act, b2, k.BIAS_ROW)
        ctx.save_for_backward(x, w1, w2, pre)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        k = _kernels()
        x, w1, w2, pre = ctx.saved_tensors
        g = grad_out.contiguous()
        batch = g.shape[0]
        w2t = w2.t()
        d_pre, act = k.fused_matmul(w2t.expand(batch, *w2t.shape), g, epilogue=k.EPI_DGELU, aux=pre)
        # Weight gradients sum over the batch; per-sample products are [N, D_S]-sized, so small.
        grad_w2 = torch.matmul(g, act.transpose(1, 2)).sum(0, dtype=torch.float32).to(g.dtype)
        grad_b2 = g.sum((0, 2), dtype=torch.float32).to(g.dtype)
        grad_w1 = torch.matmul(d_pre, x.transpose(1, 2)).sum(0, dtype=torch.float32).to(g.dtype)
        grad_b1 = d_pre.sum((0, 2), dtype=torch.float32).to(g.dtype)
        grad_x = torch.matmul(w1.t(), d_pre)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def fused_channel_mlp(x, w1, b1, w2, b2):
    """Channel MLP over the last axis of x [..., C], all operands in one 16-bit dtype."""
    return _ChannelMlpFn.apply(x.contiguous(), w1, b1, w2, b2)


def fused_token_mlp(x, w1, b1, w2, b2):
    """Token MLP over axis 1 of x [B, N, C], all operands in one 16-bit dtype."""
    return _TokenMlpFn.apply(x.contiguous(), w1, b1, w2, b2)


# ------------------------------------------------------------------------------------ modules
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _FusedMixin:
    """Shared by both fused MLPs: adopt an eager Mlp's submodules and decide when to fuse."""

    _fused: Callable[..., torch.Tensor]  # the Triton autograd function of the subclass

    def __init__(self, mlp: Mlp) -> None:
        self._adopt(mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._fusable(x)
        if dtype is None:
            return super().forward(x)  # the eager Mlp / TokenMixingMlp forward
        return self.drop2(self._fused(*self._operands(x, dtype)))

    def _adopt(self, mlp: Mlp) -> None:
        nn.Module.__init__(self)
        # The same submodules (and so the same Parameter objects, under the same names).
        self.fc1, self.act, self.drop1, self.fc2, self.drop2 = mlp.fc1, mlp.act, mlp.drop1, mlp.fc2, mlp.drop2

    def _fusable(self, x: torch.Tensor) -> torch.dtype | None:
        dtype = _compute_dtype(x)
        if dtype not in _FUSED_DTYPES:
            return None
        if self.training and self.drop1.p > 0:  # dropout between fc1 and fc2 is not fused
            return None
        if not isinstance(self.act, nn.GELU) or self.act.approximate != "none":
            return None
        if not (x.is_cuda or interpreting()):
            return None
        return dtype

    def _operands(self, x: torch.Tensor, dtype: torch.dtype):
        # The casts autocast would do for F.linear; their backward returns fp32 grads to the params.
        return (x.to(dtype), self.fc1.weight.to(dtype), self.fc1.bias.to(dtype),
                self.fc2.weight.to(dtype), self.fc2.bias.to(dtype))


class FusedMlp(_FusedMixin, Mlp):
    """Channel MLP with the Triton path; eager ``Mlp`` semantics and parameters."""

    _fused = staticmethod(fused_channel_mlp)


class FusedTokenMixingMlp(_FusedMixin, TokenMixingMlp):
    """Token MLP with the Triton path on [B, N, C], no transposes; eager semantics and parameters."""

    _fused = staticmethod(fused_token_mlp)


class PendingResidual(NamedTuple):
    """The residual stream and a branch output not yet added to it.

    A fused block returns this instead of ``stream + branch`` so that the add happens in the same
    kernel as the LayerNorm that reads the sum: the next block's ``norm1``, or the final norm.
    """

    stream: torch.Tensor
    branch: torch.Tensor

    def resolve(self) -> torch.Tensor:
        """The sum, computed the eager way (for consumers that cannot fuse it)."""
        return self.stream + self.branch


Stream = Union[torch.Tensor, PendingResidual]


def _stream(x: Stream) -> torch.Tensor:
    return x.stream if isinstance(x, PendingResidual) else x


def _resolve(x: Stream) -> torch.Tensor:
    return x.resolve() if isinstance(x, PendingResidual) else x


def _add_norm(pending: PendingResidual, norm: nn.LayerNorm,
              out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, norm(s))`` for ``s = stream + branch``: one Triton kernel where it applies, else eager."""
    x, y = pending
    affine = norm.weight is not None and norm.bias is not None and tuple(norm.normalized_shape) == (x.shape[-1],)
    # Mixed dtypes would need eager type promotion (an fp32 stream stays fp32); keep those eager.
    if affine and x.dtype == y.dtype and x.dtype in _FUSED_DTYPES and x.shape == y.shape \
            and (x.is_cuda or interpreting()):
        return fused_add_layernorm(x, y, norm.weight, norm.bias, norm.eps, out_dtype)
    s = pending.resolve()
    return s, norm(s)


class FusedMixerBlock(MixerBlock):
    """A MixerBlock whose residual adds run in the LayerNorm kernels that read them.

    Takes the stream as a tensor (first block) or a ``PendingResidual`` from the block before,
    and returns a ``PendingResidual``: the channel-mixing add is left to the next norm. So it is
    meant for ``MlpMixer.blocks`` with the final norm a ``FusedLayerNorm``, which is what
    ``use_fused_mlp`` builds. Where fusing does not apply it runs the eager block and returns a tensor.
    """

    def __init__(self, block: MixerBlock) -> None:
        nn.Module.__init__(self)
        # The same submodules (same Parameter objects, same names), with the MLPs fused.
        self.norm1 = block.norm1
        self.mlp_tokens = _fused(block.mlp_tokens, FusedTokenMixingMlp)
        self.drop_path = block.drop_path
        self.norm2 = block.norm2
        self.mlp_channels = _fused(block.mlp_channels, FusedMlp)

    def forward(self, x: Stream) -> Stream:  # type: ignore[override]
        dtype = _norm_dtype(_stream(x))
        if dtype is None:
            return super().forward(_resolve(x))
        if isinstance(x, PendingResidual):
            x, normed = _add_norm(x, self.norm1, dtype)
        else:
            normed = self.norm1(x)  # the first block: no residual add before it
        # Drop-path scales the branch before the add, exactly where eager applies it.
        x, normed = _add_norm(PendingResidual(x, self.drop_path(self.mlp_tokens(normed))), self.norm2, dtype)
        return PendingResidual(x, self.drop_path(self.mlp_channels(normed)))


class FusedLayerNorm(nn.LayerNorm):
    """The model's final LayerNorm, completing the last block's ``PendingResidual`` in its kernel.

    Same parameters as the LayerNorm it replaces; on a plain tensor it is that LayerNorm.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        # LayerNorm's own __init__ sets every attribute torch expects; the parameters it makes on
        # the meta device (no memory) are then replaced by the original ones.
        super().__init__(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                         bias=norm.bias is not None, device="meta")
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: Stream) -> torch.Tensor:  # type: ignore[override]
        if not isinstance(x, PendingResidual):
            return super().forward(x)
        stream = x.stream
        # Eager LayerNorm under autocast returns fp32 (an autocast fp32 op): keep the features' dtype.
        autocast = torch.is_autocast_enabled(stream.device.type)
        return _add_norm(x, self, torch.float32 if autocast else stream.dtype)[1]


def _norm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype the fused norms write for the MLPs, or None where the block runs eager."""
    dtype = _compute_dtype(x)
    if dtype not in _FUSED_DTYPES or not (x.is_cuda or interpreting()):
        return None
    return dtype


def _fused(mlp: Mlp, cls: type) -> Mlp:
    return mlp if isinstance(mlp, cls) else cls(mlp)


def use_fused_mlp(model: nn.Module, fuse_layernorm: bool = True) -> int:
    """Swap every MixerBlock's MLPs for the fused ones in place; returns the number of blocks changed.

    With ``fuse_layernorm`` (the default), every ``MlpMixer``'s blocks also become
    ``FusedMixerBlock`` and its final norm a ``FusedLayerNorm``, so residual adds run fused into
    the norms; MixerBlocks elsewhere get only the fused MLPs, since their caller would not
    expect a ``PendingResidual``. State-dict keys and Parameter objects never change, so call
    this before building the optimiser or after: either works. Calling it again changes nothing.
    """
    count = 0
    for block in model.modules():
        if isinstance(block, MixerBlock):
            block.mlp_tokens = _fused(block.mlp_tokens, FusedTokenMixingMlp)
            block.mlp_channels = _fused(block.mlp_channels, FusedMlp)
            count += 1
    if fuse_layernorm:
        for mixer in [m for m in model.modules() if isinstance(m, MlpMixer)]:
            _fuse_residual_norms(mixer)
    return count


def _fuse_residual_norms(mixer: MlpMixer) -> None:
    for i, block in enumerate(mixer.blocks):
        if not isinstance(block, FusedMixerBlock):
            mixer.blocks[i] = FusedMixerBlock(block)
    if not isinstance(mixer.norm, FusedLayerNorm):
        mixer.norm = FusedLayerNorm(mixer.norm)
