"""Triton batched matmul with the Mixer MLP epilogues fused in. Imported only where Triton exists.

One kernel, ``C[z] = A[z] @ B[z] (+ bias) -> epilogue``, addressed through strides, so that

* the channel MLP runs on ``[B*N, C]`` rows with the weight read transposed in place, and
* the token MLP runs ``W @ x[b]`` on the ``[B, N, C]`` activations directly (weight batch stride 0):
  the token axis is the matmul's K/M axis, so no transpose of the activations is ever materialised.

Epilogues (fp32 accumulator, one rounding to the output dtype):

* ``EPI_GELU``: ``pre = acc + bias`` is written (saved for backward), and ``gelu(pre)`` is the output;
* ``EPI_DGELU`` (backward of fc2 -> GELU): ``acc * gelu'(pre)`` is the output and ``gelu(pre)`` is
  recomputed from the saved ``pre`` and written too, for the fc2 weight gradient. So the forward
  stores one hidden-sized tensor (``pre``), not two.

GELU is the exact (erf) form, as in the paper's JAX code.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
import triton.testing

from .triton_mode import interpreting

BIAS_NONE, BIAS_COL, BIAS_ROW = 0, 1, 2
EPI_NONE, EPI_GELU, EPI_DGELU = 0, 1, 2


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


@triton.jit
def _mm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, out2_ptr,
    M, N, K,
    s_az, s_am, s_ak,
    s_bz, s_bk, s_bn,
    s_cz, s_cm, s_cn,
    BIAS: tl.constexpr, EPILOGUE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    z = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: neighbouring programs share A row-blocks, which keeps them in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + z * s_az + rm[:, None] * s_am + rk[None, :] * s_ak
    b_ptrs = b_ptr + z * s_bz + rk[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            # Triton's CPU interpreter computes bf16 dots wrongly (numpy has no bf16). Products
            # of 16-bit values are exact in fp32, so upcasting first gives the tensor-core result.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk

    if BIAS == 1:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if BIAS == 2:
        acc += tl.load(bias_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)[:, None]

    c_offs = z * s_cz + rm[:, None] * s_cm + rn[None, :] * s_cn
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if EPILOGUE == 1:
        pre = acc.to(out2_ptr.dtype.element_ty)
        tl.store(out2_ptr + c_offs, pre, mask=mask)
        # GELU of the *rounded* pre-activation: exactly what backward will recompute from it.
        acc = _gelu(pre.to(tl.float32))
    if EPILOGUE == 2:
        pre = tl.load(aux_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out2_ptr + c_offs, _gelu(pre).to(out2_ptr.dtype.element_ty), mask=mask)
        acc = acc * _gelu_grad(pre)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=5, num_warps=4),
    # The token MLP's K is the token count (196 for /16 at 224 px): shorter K tiles waste less on the tail.
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
]


def autotune_bench(kernel_call: Any, quantiles: Any) -> Any:
    """How the autotuners time a candidate: 5 ms warm-up, 25 ms of runs (Triton's default is 25 + 100),
    so a model's few dozen shape keys tune in seconds at its first step. The interpreter never autotunes."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_mm_autotuned = triton.autotune(configs=_GPU_CONFIGS, key=["M", "N", "K", "BIAS", "EPILOGUE"],
                                do_bench=autotune_bench)(_mm_kernel)
AUTOTUNED: dict[str, Any] = {"mm": _mm_autotuned}  # name -> autotuner; triton_layernorm adds its kernels


def tuned_configs() -> dict[str, dict[str, str]]:
    """The configurations the autotuners picked in this process, per kernel and shape key (for bench records)."""
    return {name: {str(key): str(config) for key, config in tuner.cache.items()} for name, tuner in AUTOTUNED.items()}
# The interpreter runs every program in numpy: small fixed tiles keep CPU tests quick and still
# exercise partial tiles and the K loop.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


def fused_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    bias_axis: int = BIAS_NONE,
    epilogue: int = EPI_NONE,
    aux: torch.Tensor | None = None,
    out_shape: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``a`` [Z, M, K] @ ``b`` [Z, K, N] -> ``c`` [Z, M, N] (contiguous), any strides in, stride 0 allowed.

    Returns ``(c, out2)``: ``out2`` is the pre-activation for EPI_GELU, the recomputed GELU for
    EPI_DGELU (where ``aux`` holds the saved pre-activation, laid out like ``c``), else None.
    ``out_shape`` allocates ``c`` and ``out2`` in that shape (same elements, e.g. [B, N, C] for
    Z = 1, M = B * N) so that callers return them without a view (FSDP2 warns about views).
    """
    z, m, k = a.shape
    zb, kb, n = b.shape
    if zb != z or kb != k:
        raise ValueError(f"fused_matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not match")
    result = torch.empty(out_shape or (z, m, n), device=a.device, dtype=a.dtype)
    out2 = torch.empty_like(result) if epilogue != EPI_NONE else None
    c = result.view(z, m, n)  # the kernel's view; out2 and aux share its layout
    if aux is not None:
        aux = aux.contiguous().view(c.shape)
    dummy = c  # pointer for unused operands; never read or written
    args = (a, b, c, bias if bias is not None else dummy, aux if aux is not None else dummy,
            out2 if out2 is not None else dummy, m, n, k, *a.stride(), *b.stride(), *c.stride())
    if interpreting():
        meta = _INTERPRETER_CONFIG
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), z)
        _mm_kernel[grid](*args, BIAS=bias_axis, EPILOGUE=epilogue, UPCAST=True, **meta)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), z)

        _mm_autotuned[grid](*args, BIAS=bias_axis, EPILOGUE=epilogue, UPCAST=False)
    return result, out2
