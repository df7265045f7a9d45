"""Export a checkpoint's model for use elsewhere: a safetensors file and/or a timm state dict.

  python -m pretrain.export runs/l16 --out l16.safetensors                 # newest valid checkpoint
  python -m pretrain.export runs/l16/checkpoints/step_0100000 --out l16_bf16.safetensors --dtype bf16
  python -m pretrain.export s3://bucket/runs/l16 --out l16.pth --format timm-pth
  python -m pretrain.export runs/l16 --print-step                         # just say which step

Every engine writes the same consolidated `model.safetensors` into its checkpoints (rank 0 gathers
it), so exporting never needs the engine, the world size or a GPU. The file is verified against
the sha256 in the checkpoint's metadata.json before anything is written. Parameter names already
are timm's `mlp_mixer` names, so `timm-pth` is the same tensors as a plain `{name: tensor}` dict
saved with torch.save. In timm (the export prints this line filled in for its model; variants timm
does not register are built from `timm.models.mlp_mixer.MlpMixer` with their sizes instead):

  timm.create_model("mixer_b16_224", pretrained=True, pretrained_cfg_overlay=dict(file="b16.pth", num_classes=N))

`num_classes=N` belongs in the overlay: timm sizes the model from it, and where the pretrained
config's class count differs from the model's it drops the trained head without a word (and
without it a head of other than 1000 classes fails with a size mismatch). A model trained with
`model.act=gelu_tanh` also needs `act_layer=functools.partial(torch.nn.GELU, approximate="tanh")`:
timm's Mixer runs exact GELU. The safetensors metadata records `act`, `step`, `model` and more;
`model.load_state_dict(torch.load(f, weights_only=True))` works as well.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys

import fsspec
import torch
from omegaconf import OmegaConf
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import write_url_atomic
from .checkpoint import STEP_DIR, CheckpointError
from .models import activation_name, create_model
from .models.mixer import MODEL_CFGS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("safetensors", "timm-pth")


def find_checkpoint(path: str) -> str:
    """A checkpoint directory as given, or the newest one under `<run dir>/checkpoints` that verifies."""
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if fs.exists(f"{root}/metadata.json"):
        return path.rstrip("/")
    if not fs.exists(f"{root}/checkpoints"):
        raise CheckpointError(f"{path}: neither a checkpoint (no metadata.json) nor a run dir (no checkpoints/)")
    steps = sorted((int(m.group(1)), p) for p in fs.ls(f"{root}/checkpoints", detail=False)
                   if (m := STEP_DIR.match(p.rstrip("/").rsplit("/", 1)[-1])))
    problems = []
    for _, ckpt in reversed(steps):
        url = fs.unstrip_protocol(ckpt) if "://" in path else ckpt
        try:
            read_model(url)
            return url
        except CheckpointError as e:
            problems.append(str(e))
    detail = f"; skipped: {'; '.join(problems)}" if problems else ""
    raise CheckpointError(f"{path}: no valid checkpoint under checkpoints/{detail}")


def read_model(checkpoint: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's consolidated weights, verified against metadata.json, and the metadata."""
    fs, root = fsspec.core.url_to_fs(checkpoint)
    root = root.rstrip("/")
    try:
        meta = json.loads(fs.cat_file(f"{root}/metadata.json"))
        expected = meta["files"]["model.safetensors"]
        data = fs.cat_file(f"{root}/model.safetensors")
    except FileNotFoundError as e:
        raise CheckpointError(f"{checkpoint}: missing {e.filename or 'file'} (incomplete checkpoint)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{checkpoint}/metadata.json: unreadable or lists no model.safetensors") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{checkpoint}/model.safetensors: checksum mismatch (file corrupt or partly written)")
    return st_load(data), meta


def convert(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype`, others untouched; contiguous, detached from any storage sharing."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}


def export_bytes(state: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str]) -> bytes:
    if fmt == "safetensors":
        return st_save(state, metadata=metadata)
    buf = io.BytesIO()
    torch.save(state, buf)  # plain {name: tensor}: loads with weights_only=True, as timm does
    return buf.getvalue()


# Mixer variants timm registers under our names (others: timm's MlpMixer class with their sizes).
TIMM_MIXERS = ("mixer_s32_224", "mixer_s16_224", "mixer_b32_224", "mixer_b16_224", "mixer_l32_224", "mixer_l16_224")


def checkpoint_model_config(checkpoint: str, meta: dict) -> dict:
    """The `model:` section the checkpoint was trained with (its config.yaml, checked against its sha256),
    {} where missing, altered or unreadable: the variant's defaults are then the best guess."""
    fs, root = fsspec.core.url_to_fs(checkpoint)
    try:
        data = fs.cat_file(f"{root.rstrip('/')}/config.yaml")
        if hashlib.sha256(data).hexdigest() != meta["files"]["config.yaml"]:
            return {}
        model = OmegaConf.to_container(OmegaConf.create(data.decode())).get("model")
    except Exception:  # noqa: BLE001
        return {}
    return model if isinstance(model, dict) else {}


def model_act(name: str, act: str | None) -> str:
    """The MLP activation of model `name` built with `act` (None: the variant's own), or '?' if unknown."""
    try:
        with torch.device("meta"):  # no memory, no init: only the modules are looked at
            model = create_model(name, **({"act": act} if act else {}))
    except (ValueError, TypeError):
        return "?"
    return activation_name(model) or "?"


def timm_recipe(name: str, num_classes: int, act: str, file: str, img_size: int | None = None) -> str:
    """Python source that builds `model`, a timm MlpMixer holding an export of `name` with its trained head.

    timm's registered Mixers fix patch size, depth and width, so variants timm does not register
    (and other resolutions) are built from timm's MlpMixer class and loaded with timm's load_checkpoint.
    """
    act_arg = ['act_layer=functools.partial(torch.nn.GELU, approximate="tanh")'] if act == "gelu_tanh" else []
    if name in TIMM_MIXERS:
        args = [repr(name), "pretrained=True", f"pretrained_cfg_overlay=dict(file={file!r}, num_classes={num_classes})"]
        args += [f"img_size={img_size}"] if img_size not in (None, 224) else []
        return f"model = timm.create_model({', '.join(args + act_arg)})"
    sizes = {**MODEL_CFGS.get(name, {}), **({"img_size": img_size} if img_size else {})}
    args = [f"num_classes={num_classes}"] + [f"{k}={v!r}" for k, v in sizes.items()] + act_arg
    return (f"model = timm.models.mlp_mixer.MlpMixer({', '.join(args)}); "
            f"timm.models.load_checkpoint(model, {file!r})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="CHECKPOINT_DIR_OR_RUN_DIR", help="local path or fsspec URL")
    p.add_argument("--out", help="file (path or URL) to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="default: from --out's suffix (.pth/.pt -> timm-pth, else safetensors)")
    p.add_argument("--print-step", action="store_true", help="print the step of the checkpoint that would be used")
    args = p.parse_args(argv)
    if not args.out and not args.print_step:
        p.error("--out is required (or --print-step)")
    try:
        checkpoint = find_checkpoint(args.source)
        state, meta = read_model(checkpoint)
        if args.print_step:
            print(meta["step"])
            return 0
        fmt = args.format or ("timm-pth" if args.out.endswith((".pth", ".pt")) else "safetensors")
        state = convert(state, DTYPES[args.dtype])
        name, model_cfg = str(meta.get("model", "?")), checkpoint_model_config(checkpoint, meta)
        act = model_act(name, model_cfg.get("act"))
        info = {"source": checkpoint, "step": str(meta["step"]), "model": name, "act": act,
                "dtype": args.dtype, "code_version": str(meta.get("code_version", "?"))}
        write_url_atomic(args.out, export_bytes(state, fmt, info))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in state.values())
    print(f"exported {checkpoint} (step {meta['step']}, {n / 1e6:.2f}M parameters, act {act}) -> {args.out} "
          f"[{fmt}, {args.dtype}]")
    if "head.weight" in state and name.startswith("mixer_"):
        print("timm: " + timm_recipe(name, state["head.weight"].shape[0], act, args.out, model_cfg.get("img_size")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
