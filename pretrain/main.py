"""Pre-train an MLP-Mixer.

  python pretrain/main.py                                      # the demo: CPU, a few minutes
  python pretrain/main.py --config configs/b16.yaml train.steps=1000 optim.lr=3e-3
  python -m cluster.launch --nproc-per-node 2 -- --config configs/demo.yaml  # torchrun, DDP over gloo/nccl
  deepspeed pretrain/main.py --config configs/h14.yaml        # the launcher passes --local_rank
  python pretrain/main.py --config configs/l16.yaml --print-config
  python pretrain/main.py --config configs/h14.yaml --estimate-memory 64 train.device=cuda  # fit on 64 GPUs?
  python pretrain/main.py --config configs/s32.yaml --dry-run data.train=...  # one step, nothing written

Any `dotted.key=value` after the options overrides the config file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the project packages, not this folder's files
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (default: the demo)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint (= checkpoint.resume=auto)")
    p.add_argument("--estimate-memory", type=int, metavar="WORLD_SIZE",
                   help="print the memory estimate of this command line's run on WORLD_SIZE ranks and whether "
                        "it fits, then exit (for the device the run would use: a GPU where one is visible or "
                        "train.device=cuda, else this host's CPU)")
    p.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                   help="with --estimate-memory for GPUs: the memory of one GPU (default: the visible GPU's, "
                        "else 80)")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything, run one training step on one batch, write nothing; report the memory "
                        "estimate against the measured peak")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def report(message: str, lost_peer: bool = False) -> None:
    """The one line a user error ends with. Under `python -m cluster.launch` (which sets
    MIXER_LAUNCH_REPORTS) each rank leaves it in torchrun's per-rank error file instead, and the
    launcher prints every distinct line once, rather than each rank printing the same one.
    ``lost_peer``: this rank only lost its connection to a rank that died; the launcher names that one."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and os.environ.get("MIXER_LAUNCH_REPORTS") == "1":
        with open(error_file, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time()), "lost_peer": lost_peer}, f)
        return
    print(f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from data_pipeline.errors import first_line
    from pretrain.config import ConfigError, load_config, to_yaml
    from pretrain.exit_codes import BAD_INPUT, DONE

    overrides = list(args.overrides) + (["checkpoint.resume=auto"] if args.resume else [])
    try:  # before torch is imported: a bad value is reported in a second
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        report(first_line(e))
        return BAD_INPUT
    if args.print_config:
        print(to_yaml(cfg), end="")
        return DONE
    from pretrain.faults import ending
    from pretrain.trainer import Trainer

    trainer = None
    try:
        if args.estimate_memory:
            import torch

            from pretrain.build import memory_report
            # For the device the run would use: train.device, or (auto) a GPU where one is visible.
            cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
            print(memory_report(cfg, args.estimate_memory, args.config, device_type="cuda" if cuda else "cpu",
                                gpu_memory_gib=args.gpu_memory_gib))
            return DONE
        if args.dry_run:
            from pretrain.dry_run import dry_run
            for line in dry_run(cfg, args.config, args.local_rank):
                print(line)
            return DONE
        trainer = Trainer(cfg, config_source=args.config, local_rank=args.local_rank)
        trainer.train()
    except Exception as e:  # noqa: BLE001 -- pretrain/faults.py maps each known cause to its line and exit code
        end = ending(e)
        if end is None:
            raise
        if end.plain:
            print(end.line, file=sys.stderr)
        else:
            report(end.line, lost_peer=end.lost_peer)
        return end.code
    finally:
        if trainer is not None:
            trainer.close()
    return DONE


if __name__ == "__main__":
    sys.exit(main())
