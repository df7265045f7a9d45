"""SLURM node lists (`gpu[001-004,010],cpu7`) to host names, and host names to a DeepSpeed hostfile.

  python -m cluster.hostlist 'gpu[001-004,010],cpu7'          # one host per line
  python -m cluster.hostlist --hostfile hosts.txt --slots 8   # from $SLURM_JOB_NODELIST

Written here rather than taken from `python-hostlist` (GPL-2.0, this project is Apache-2.0) or
`scontrol show hostnames` (absent where a dry run is made, e.g. on a laptop). The grammar is
SLURM's: comma-separated items, each a name with any number of bracketed groups of numbers or
zero-padded ranges (`rack[1-2]-n[01-04]` is the product of both groups).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys

_ITEM = re.compile(r"([^\[\]]*)(?:\[([^\[\]]*)\])?")


class HostlistError(ValueError):
    """A node list that SLURM would not accept; the message names it."""


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth not in (0, 1):
            raise HostlistError(f"node list {nodelist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise HostlistError(f"node list {nodelist!r}: unbalanced brackets")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_group(group: str, nodelist: str) -> list[str]:
    out = []
    for part in group.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise HostlistError(f"node list {nodelist!r}: bad range {part!r} in [{group}]")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise HostlistError(f"node list {nodelist!r}: range {part!r} runs backwards")
        width = len(lo)  # SLURM pads to the width of the lower bound: 001-004 -> 001 002 003 004
        out.extend(f"{n:0{width}d}" for n in range(int(lo), int(hi) + 1))
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """`gpu[001-004,010],cpu7` -> ['gpu001', 'gpu002', 'gpu003', 'gpu004', 'gpu010', 'cpu7']."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        choices: list[list[str]] = []
        for text, group in _ITEM.findall(item):
            if text:
                choices.append([text])
            if group:
                choices.append(_expand_group(group, nodelist))
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    if not hosts:
        raise HostlistError(f"node list {nodelist!r} names no hosts")
    return hosts


def hostfile_text(hosts: list[str], slots: int) -> str:
    """The DeepSpeed launcher's hostfile: one `host slots=N` line per node (N = GPUs per node)."""
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("nodelist", nargs="?", default=os.environ.get("SLURM_JOB_NODELIST", ""),
                   help="default: $SLURM_JOB_NODELIST")
    p.add_argument("--hostfile", help="write a DeepSpeed hostfile here instead of printing the hosts")
    p.add_argument("--slots", type=int, default=1, help="processes (GPUs) per host in the hostfile")
    args = p.parse_args(argv)
    try:
        if not args.nodelist:
            raise HostlistError("no node list given and SLURM_JOB_NODELIST is not set")
        hosts = expand_hostlist(args.nodelist)
    except HostlistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.hostfile:
        with open(args.hostfile, "w") as f:
            f.write(hostfile_text(hosts, args.slots))
    else:
        print("\n".join(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
