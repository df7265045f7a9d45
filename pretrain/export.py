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
import sys

import torch
from omegaconf import OmegaConf

from .checkpoint import CheckpointError, CheckpointReader
from .models import activation_name, create_model
from .models.interop import EXPORT_FORMATS, export_timm
from .models.mixer import MODEL_CFGS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def find_checkpoint(source: str) -> tuple[CheckpointReader, int, dict[str, torch.Tensor], dict]:
    """The checkpoint `source` names, or the newest one under `<run dir>/checkpoints` whose weights
    verify: its reader, step, weights (checked against metadata.json) and metadata."""
    reader, step = CheckpointReader.locate(source)

    def read(s: int) -> tuple[dict[str, torch.Tensor], dict]:
        meta = reader.read_metadata(s)
        return reader.read_weights(s, meta), meta

    if step is not None:
        return (reader, step, *read(step))
    problems: list[str] = []
    found = reader.newest_valid(read, skipped=problems.append)
    if found is None:
        detail = f"; skipped: {'; '.join(problems)}" if problems else ""
        raise CheckpointError(f"{source}: no valid checkpoint under checkpoints/{detail}")
    return (reader, found[0], *found[1])


# Mixer variants timm registers under our names (others: timm's MlpMixer class with their sizes).
TIMM_MIXERS = ("mixer_s32_224", "mixer_s16_224", "mixer_b32_224", "mixer_b16_224", "mixer_l32_224", "mixer_l16_224")


def checkpoint_model_config(reader: CheckpointReader, step: int, meta: dict) -> dict:
    """The `model:` section the checkpoint was trained with (its config.yaml, checked against its sha256),
    {} where missing, altered or unreadable: the variant's defaults are then the best guess."""
    try:
        config = OmegaConf.to_container(OmegaConf.create(reader.read_config(step, meta)))
    except Exception:  # noqa: BLE001
        return {}
    model, data = config.get("model"), config.get("data")
    if not isinstance(model, dict):
        return {}
    if model.get("img_size") is None and isinstance(data, dict) and data.get("image_size"):
        model["img_size"] = data["image_size"]  # the model was built at the data's resolution
    return model


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
    p.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                   help="default: from --out's suffix (.pth/.pt -> timm-pth, else safetensors)")
    p.add_argument("--print-step", action="store_true", help="print the step of the checkpoint that would be used")
    args = p.parse_args(argv)
    if not args.out and not args.print_step:
        p.error("--out is required (or --print-step)")
    try:
        reader, step, state, meta = find_checkpoint(args.source)
        if args.print_step:
            print(meta["step"])
            return 0
        checkpoint = reader.url(reader.step_path(step))
        fmt = args.format or ("timm-pth" if args.out.endswith((".pth", ".pt")) else "safetensors")
        name, model_cfg = str(meta.get("model", "?")), checkpoint_model_config(reader, step, meta)
        act = model_act(name, model_cfg.get("act"))
        info = {"source": checkpoint, "step": str(meta["step"]), "model": name, "act": act,
                "dtype": args.dtype, "code_version": str(meta.get("code_version", "?"))}
        export_timm(state, args.out, fmt, DTYPES[args.dtype], info)
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
