"""Move Mixer weights between our models, timm files and the official JAX ``.npz`` checkpoints.

Our parameter names *are* timm's (``stem.proj.weight``, ``blocks.N.mlp_tokens.fc1.weight``, ...),
so a timm state dict needs no renaming; the JAX checkpoints of google-research/vision_transformer
and big_vision use flax names and layouts and are converted here:

=====================================================  ==========================================
JAX key (flattened with ``/``)                         ours (timm)
=====================================================  ==========================================
``stem/kernel`` [P, P, C_in, C] (HWIO)                 ``stem.proj.weight`` [C, C_in, P, P] (OIHW)
``stem/bias``                                          ``stem.proj.bias``
``MixerBlock_i/LayerNorm_0/{scale,bias}``              ``blocks.i.norm1.{weight,bias}``
``MixerBlock_i/token_mixing/Dense_j/kernel`` [in,out]  ``blocks.i.mlp_tokens.fc{j+1}.weight`` [out,in]
``MixerBlock_i/LayerNorm_1/{scale,bias}``              ``blocks.i.norm2.{weight,bias}``
``MixerBlock_i/channel_mixing/Dense_j/...``            ``blocks.i.mlp_channels.fc{j+1}...``
``pre_head_layer_norm/{scale,bias}``                   ``norm.{weight,bias}``
``head/{kernel,bias}``                                 ``head.{weight,bias}``
=====================================================  ==========================================

The official JAX Mixer calls flax's ``nn.gelu``, which is the tanh approximation
(``jax.nn.gelu(approximate=True)``), so its checkpoints give their logits only in a model built
with ``act="gelu_tanh"``. Loading an ``.npz`` therefore refuses a model with another activation
(one line); ``npz_act="gelu"`` declares a file trained with exact GELU instead (e.g. our own
``export_jax`` of a ``gelu`` model, which would otherwise refuse to write it).

:func:`export_timm` is the one exporter of timm files (``python -m pretrain.export`` writes through it).

Loading never unpickles code: ``.safetensors``, ``torch.load(weights_only=True)`` and
``numpy.load(allow_pickle=False)``. Every problem with a file is one line naming the file and
the first offending key.
"""

from __future__ import annotations

import io
import re
from typing import Mapping

import fsspec
import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from ..atomic import write_url_atomic
from .mixer import activation_name

__all__ = [
    "CheckpointMismatchError",
    "read_state_dict",
    "jax_to_timm",
    "timm_to_jax",
    "load_pretrained",
    "export_timm",
    "export_jax",
    "check_compatible",
]

# Keys under which training frameworks nest a model's state dict in a .pth file.
_NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_HEAD_KEYS = ("head.weight", "head.bias")
# What flax's nn.gelu computes (approximate=True): the activation of every official JAX checkpoint.
JAX_ACT = "gelu_tanh"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message is one line naming the first bad key."""


def _read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: checkpoint not found") from None


def _format(url: str) -> str:
    name = url.rsplit("/", 1)[-1].lower()
    for ext, fmt in ((".safetensors", "safetensors"), (".npz", "npz"), (".pth", "torch"), (".pt", "torch"),
                     (".bin", "torch")):
        if name.endswith(ext):
            return fmt
    raise ValueError(f"{url}: unknown checkpoint format; use .safetensors, .pth/.pt/.bin or .npz")


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (any fsspec URL) in *our* (timm) naming and layout.

    ``.npz`` files are taken to be JAX checkpoints and converted with :func:`jax_to_timm`.
    """
    fmt = _format(url)
    data = _read_bytes(url)
    try:
        if fmt == "safetensors":
            return dict(load_safetensors_bytes(data))
        if fmt == "npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle that wants to run code: one line, no traceback
        raise ValueError(f"{url}: cannot read {fmt} checkpoint: {str(e).strip().splitlines()[0]}") from None
    if fmt == "npz":
        return jax_to_timm(arrays, source=url)
    for key in _NESTED_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{url}: expected a mapping of parameter names to tensors")
    # DDP/compile wrappers prefix every key; strip so the names are timm's again.
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items()}


# ---------------------------------------------------------------------------------- JAX layout
_JAX_BLOCK = re.compile(r"^MixerBlock_(\d+)/(.+)$")
_JAX_IN_BLOCK = {
    "LayerNorm_0": "norm1",
    "LayerNorm_1": "norm2",
    "token_mixing/Dense_0": "mlp_tokens.fc1",
    "token_mixing/Dense_1": "mlp_tokens.fc2",
    "channel_mixing/Dense_0": "mlp_channels.fc1",
    "channel_mixing/Dense_1": "mlp_channels.fc2",
}
_JAX_TOP = {"stem": "stem.proj", "pre_head_layer_norm": "norm", "head": "head"}
_JAX_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _jax_name_to_ours(key: str) -> str | None:
    # Some exports prefix the tree with "params/" or "opt/target/"; the model tree follows it.
    key = re.sub(r"^(opt/target/|params/)", "", key)
    module, _, leaf = key.rpartition("/")
    if leaf not in _JAX_LEAF:
        return None
    block = _JAX_BLOCK.match(module)
    if block:
        inner = _JAX_IN_BLOCK.get(block.group(2))
        return f"blocks.{block.group(1)}.{inner}.{_JAX_LEAF[leaf]}" if inner else None
    top = _JAX_TOP.get(module)
    return f"{top}.{_JAX_LEAF[leaf]}" if top else None


def jax_to_timm(arrays: Mapping[str, np.ndarray], source: str = "npz") -> dict[str, torch.Tensor]:
    """Flax Mixer parameters (``/``-joined names) -> our state dict (OIHW conv, [out, in] Linear)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in arrays.items():
        name = _jax_name_to_ours(key)
        if name is None:
            raise CheckpointMismatchError(f"{source}: unexpected key {key!r} (not a Mixer parameter)")
        t = torch.from_numpy(np.ascontiguousarray(value)).float()
        if key.endswith("/kernel"):
            if t.dim() == 4:  # conv HWIO -> OIHW
                t = t.permute(3, 2, 0, 1)
            elif t.dim() == 2:  # Dense [in, out] -> Linear [out, in]
                t = t.t()
            else:
                raise CheckpointMismatchError(f"{source}: key {key!r} has shape {tuple(t.shape)}; "
                                              f"expected a 2-D Dense or 4-D conv kernel")
        out[name] = t.contiguous()
    return out


def timm_to_jax(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Inverse of :func:`jax_to_timm`: our state dict -> flax names and layouts."""
    inverse_block = {v: k for k, v in _JAX_IN_BLOCK.items()}
    inverse_top = {v: k for k, v in _JAX_TOP.items()}
    out: dict[str, np.ndarray] = {}
    for name, t in state_dict.items():
        module, _, leaf = name.rpartition(".")
        block = re.match(r"^blocks\.(\d+)\.(.+)$", module)
        jax_module = (f"MixerBlock_{block.group(1)}/{inverse_block[block.group(2)]}" if block
                      else inverse_top[module])
        t = t.detach().float().cpu()
        if leaf == "weight" and t.dim() == 4:
            jax_leaf, t = "kernel", t.permute(2, 3, 1, 0)
        elif leaf == "weight" and t.dim() == 2:
            jax_leaf, t = "kernel", t.t()
        else:
            jax_leaf = "scale" if leaf == "weight" else "bias"
        out[f"{jax_module}/{jax_leaf}"] = t.contiguous().numpy()
    return out


# ------------------------------------------------------------------------------------ loading
def check_compatible(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     skip: tuple[str, ...] = ()) -> None:
    """Raise CheckpointMismatchError (one line) at the first missing, unexpected or mis-shaped key."""
    ours = {k: v for k, v in model.state_dict().items() if k not in skip}
    # Walk in the model's order (files may store keys sorted), so "first" means first in the network.
    for key, value in ours.items():
        if key not in state_dict:
            missing = [k for k in ours if k not in state_dict]
            raise CheckpointMismatchError(f"{source}: missing key {key!r} ({len(missing)} missing in all)")
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise CheckpointMismatchError(
                f"{source}: shape mismatch at {key!r}: checkpoint {tuple(state_dict[key].shape)}, "
                f"model {tuple(value.shape)}")
    unexpected = [k for k in state_dict if k not in ours and k not in skip]
    if unexpected:
        raise CheckpointMismatchError(f"{source}: unexpected key {unexpected[0]!r} (not in the model)")


def _check_jax_act(model: nn.Module, npz_act: str, source: str) -> None:
    act = activation_name(model)
    if act != npz_act:
        raise CheckpointMismatchError(
            f"{source}: a JAX checkpoint trained with {npz_act} (flax nn.gelu is tanh-approximate) needs a model "
            f"built with act={npz_act!r} (config model.act={npz_act}); this one uses {act}")


def load_pretrained(model: nn.Module, source: str | Mapping[str, torch.Tensor], reset_head: bool = False,
                    npz_act: str = JAX_ACT) -> nn.Module:
    """Load a timm (``.pth``/``.safetensors``) or JAX (``.npz``) checkpoint into ``model``.

    ``reset_head=True`` is for transfer to a new class count: the checkpoint's head is ignored and
    the model's head is re-initialised to zeros (the paper's fine-tuning recipe).
    ``npz_act``: the activation an ``.npz`` was trained with (flax's default, tanh, for the official
    ones); a model built with another one is refused, since its logits would not be the checkpoint's.
    """
    name = source if isinstance(source, str) else "state dict"
    if isinstance(source, str) and _format(source) == "npz":
        _check_jax_act(model, npz_act, source)  # before reading: a large file is not downloaded in vain
    state_dict = read_state_dict(source) if isinstance(source, str) else dict(source)
    skip = _HEAD_KEYS if reset_head else ()
    check_compatible(model, state_dict, name, skip=skip)
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in skip}, strict=not reset_head)
    if reset_head and hasattr(model, "reset_classifier"):
        model.reset_classifier(model.num_classes)
    return model


# ------------------------------------------------------------------------------------ export
EXPORT_FORMATS = ("safetensors", "timm-pth")


def _plain_tensors(model_or_sd: nn.Module | Mapping[str, torch.Tensor],
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Floating tensors as `dtype` (others untouched), on the CPU, contiguous and each with storage of its own
    (safetensors refuses shared storage); contiguous CPU fp32 is what timm users expect."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous().clone()
            for k, v in sd.items()}


def export_timm(model_or_sd: nn.Module | Mapping[str, torch.Tensor], url: str, fmt: str | None = None,
                dtype: torch.dtype = torch.float32, metadata: Mapping[str, str] | None = None) -> None:
    """Write timm-loadable weights to `url` (any fsspec URL, whole or not at all): `fmt` "safetensors"
    (with `metadata`, and a model's activation as `act`), or "timm-pth", a plain ``{name: tensor}`` dict
    saved with torch.save, which loads with ``weights_only=True`` as timm does. Default: from the suffix."""
    if fmt is None:
        fmt = {"safetensors": "safetensors", "torch": "timm-pth"}.get(_format(url))
        if fmt is None:
            raise ValueError(f"{url}: export_timm writes .safetensors or .pth; use export_jax for .npz")
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    tensors = _plain_tensors(model_or_sd, dtype)
    if fmt == "safetensors":
        # The activation is not in the weights but decides the logits (gelu vs gelu_tanh): record it.
        act = activation_name(model_or_sd) if isinstance(model_or_sd, nn.Module) else None
        info = {**({"act": act} if act else {}), **(metadata or {})}
        data = save_safetensors_bytes(tensors, metadata=info or None)
    else:
        buf = io.BytesIO()
        torch.save(tensors, buf)
        data = buf.getvalue()
    write_url_atomic(url, data)


def export_jax(model_or_sd: nn.Module | Mapping[str, torch.Tensor], url: str, npz_act: str = JAX_ACT) -> None:
    """Write a vision_transformer/big_vision-style ``.npz`` (flax names, HWIO / [in, out] kernels).

    The JAX code runs it with ``nn.gelu`` (tanh), so a model with another activation is refused unless
    ``npz_act`` says the file is meant for that one (a .npz has no place to record it).
    """
    if isinstance(model_or_sd, nn.Module):
        _check_jax_act(model_or_sd, npz_act, url)
    buf = io.BytesIO()
    np.savez(buf, **timm_to_jax(_plain_tensors(model_or_sd)))
    write_url_atomic(url, buf.getvalue())
