"""A replica group lost mid-run: torchft (engine.fault_tolerance=torchft) against an elastic torchrun restart.

  python bench/torchft_failover.py [--steps 60] [--kill-at 30] [--out bench/results/torchft_failover_cpu.json]
  python bench/torchft_failover.py --only hsdp_clean fsdp_clean hsdp_kill --repeat 3 \
      --out bench/results/torchft_hsdp_cpu.json

CPU, gloo, loopback, the test model (mixer_p4_32), 3 replica groups of one rank (torchft) or 3 elastic
torchrun "nodes" of one rank (`--nnodes 1:3`, today's restart). Runs, one after the other:

* `torchft_clean` / `ddp_clean`: no failure; the final loss and the median step time (per-step cost of
  fault tolerance when nothing fails: torchft's quorum, commit vote and cross-group all-reduce against
  DDP's all-reduce over the same 3 ranks).
* `torchft_kill`: group 2 SIGKILLed (agent, rank and data workers) once step `kill_at` is committed, and a
  replacement started at once. Times from the records of tests/drivers/ft_train.py: kill -> the survivors'
  next committed step; replacement start -> its first committed step. Samples lost or consumed twice are
  counted over the run from every group's record of what each committed step consumed, against the
  data position of the final checkpoint.
* `elastic_kill`: the same kill under elastic torchrun (checkpoint every `every` steps): the survivors'
  ranks restart on 2 nodes and resume from the newest checkpoint (the steps since then are recomputed);
  a replacement node joining makes every rank restart again, from the newest checkpoint.

HSDP (engine.kind=fsdp under torchft), 2 replica groups of 2 ranks against plain fsdp on the same 4 ranks:

* `hsdp_clean` / `fsdp_clean`: no failure, the per-step cost of fault tolerance (the quorum, the commit vote
  and the cross-group all-reduce of each rank's gradient shards on top of FSDP's own collectives inside
  the group); with `--repeat N` the two alternate N times and the medians are reported.
* `hsdp_kill`: group 1 (both ranks) SIGKILLed at `kill_at`, a replacement group started at once, which
  recovers its shards live from group 0.

While a killed group's replacement starts (torchft), and through the whole elastic_kill run, the steps are
slowed by 0.5 s so that the run is still going when the replacement is ready (its start-up, not the step
time, is what is measured); the final loss is the mean over the last 5 steps of group/rank 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import ROOT, free_port  # noqa: E402
from tests.drivers.ft_train import account  # noqa: E402
from tests.integration.test_elastic_node_loss import write_epoch  # noqa: E402
from tests.procs import Procs, kill_node, wait_until  # noqa: E402

FT_DRIVER = str(ROOT / "tests/drivers/ft_train.py")
ELASTIC_DRIVER = str(ROOT / "tests/drivers/elastic_train.py")
GROUPS, GROUP_BATCH, SAMPLES = 3, 4, 800
STEP_LINE = re.compile(r"^(\d\d:\d\d:\d\d) \[rank 0\] step (\d+)/\d+  loss ([0-9.]+)", re.M)


# The scenarios: (engine.kind, replica groups, ranks per group); a plain run has the same ranks in one world.
SETUPS = {"torchft": ("ddp", GROUPS, 1), "ddp": ("ddp", GROUPS, 1), "elastic": ("ddp", GROUPS, 1),
          "hsdp": ("fsdp", 2, 2), "fsdp": ("fsdp", 2, 2)}


def args_for(run_dir: Path, spec: str, steps: int, every: int, ft: bool, kind: str = "ddp",
             groups: int = GROUPS, ranks: int = 1) -> list[str]:
    return ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={run_dir}", "data.prepare=none",
            f"data.train={spec}", "data.val=''", "model.name=mixer_p4_32", f"train.steps={steps}",
            f"train.global_batch_size={groups * GROUP_BATCH}", f"checkpoint.every_steps={every}",
            "checkpoint.keep_last=20", "train.log_every=1", "optim.warmup_steps=5", "eval.mode=none",
            "data.num_workers=1", "data.shuffle_buffer=100", "train.device=cpu", f"engine.kind={kind}",
            *(["engine.fault_tolerance=torchft", f"engine.torchft.replica_groups={groups}"] if ft else [])]


def records(rec: Path) -> list[dict]:
    return [{**json.loads(line), "file": p.name}
            for p in rec.glob("group*.jsonl") for line in p.read_text().splitlines()]


def committed(rec: Path, group: str) -> list[dict]:
    """The committed steps of `group`, from its rank 0's records."""
    return [r for r in records(rec) if r["file"].startswith(f"{group}.") and r.get("committed")
            and r.get("rank", 0) == 0]


def losses(log: Path) -> dict[int, float]:
    return {int(m.group(2)): float(m.group(3)) for m in STEP_LINE.finditer(log.read_text())}


def final_loss(log: Path, steps: int) -> float:
    found = losses(log)
    return statistics.mean(found[s] for s in range(steps - 4, steps + 1))


def step_time_s(rec: Path, group: str = "group0", skip: int = 5) -> float:
    """Median seconds between consecutive steps of `group`'s rank 0 (after the first `skip`), from the
    driver's per-step records (taken before the test pace's sleep; runs with a pace are not comparable)."""
    times = sorted(r["t"] for r in records(rec) if r["file"].startswith(f"{group}.") and "stepped" in r
                   and r.get("rank", 0) == 0)
    return statistics.median(b - a for a, b in zip(times[skip:], times[skip + 1:]))


def consumed_count(checkpoint: Path) -> int:
    c = torch.load(checkpoint / "shared.pt", weights_only=True)["data"]["sources"][0]["consumed"]
    return sum(c[i + 1] - c[i] for i in range(0, len(c), 2))


def run_torchft(tmp: Path, spec: str, epoch: list[str], steps: int, kill_at: int | None, kind: str = "ddp",
                groups: int = GROUPS, ranks: int = 1) -> dict:
    rec = tmp / "rec"
    rec.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FT_RECORD_DIR": str(rec),
           "PYTHONPATH": str(ROOT)}
    port = free_port()
    p = Procs(tmp, env)
    args = args_for(tmp / "run", spec, steps, 20, ft=True, kind=kind, groups=groups, ranks=ranks)
    last = f"g{groups - 1}"  # the group killed
    out: dict = {}
    try:
        lh = p.start("lighthouse", [sys.executable, "-m", "cluster.launch", "--torchft-lighthouse",
                                    "--lighthouse-port", str(port)])
        wait_until(lambda: "torchft lighthouse at" in lh.read_text(), 60, "lighthouse")
        ft_env = {"TORCHFT_LIGHTHOUSE": f"http://127.0.0.1:{port}"}
        logs = [p.torchrun(f"g{g}", FT_DRIVER, args, nproc=ranks, REPLICA_GROUP_ID=str(g), **ft_env)
                for g in range(groups)]
        if kill_at:
            wait_until(lambda: any(r["done"] >= kill_at for r in committed(rec, "group0")), 300, f"step {kill_at}")
            (rec / "step_sleep_s").write_text("0.5")
            kill_node(p.procs[last].pid)
            killed = time.time()
            pids_before = {r["file"] for r in records(rec)}
            p.torchrun(f"{last}_new", FT_DRIVER, args, nproc=ranks, REPLICA_GROUP_ID=str(groups - 1), **ft_env)
            started = time.time()
            wait_until(lambda: any(r["t"] > killed for r in committed(rec, "group0")), 120, "a survivor's step")
            out["kill_to_survivor_step_s"] = min(r["t"] for r in committed(rec, "group0") if r["t"] > killed) - killed
            new = lambda: [r for r in committed(rec, f"group{groups - 1}")  # noqa: E731
                           if r["file"] not in pids_before]
            wait_until(lambda: bool(new()), 180, "a replacement step")
            out["replacement_start_to_first_step_s"] = min(r["t"] for r in new()) - started
            (rec / "step_sleep_s").write_text("0")
            text = (tmp / f"{last}_new.log").read_text()
            recovered = re.search(r"recovered live from a peer at step (\d+)", text)
            out["replacement_recovered_live_at_step"] = int(recovered.group(1)) if recovered else None
            out["replacement_read_checkpoint"] = "resumed from" in text
        for name in [n for n in p.procs if n.startswith("g") and (n != last or not kill_at)]:
            if p.procs[name].wait(timeout=600) != 0:
                raise RuntimeError(f"{name} failed: {(tmp / f'{name}.log').read_text()[-2000:]}")
    finally:
        p.stop()
    acc = account(rec)
    keys = acc["keys"]
    position = consumed_count(tmp / f"run/replica_0/checkpoints/step_{steps:07d}")
    survivor_steps = [r["done"] for r in committed(rec, "group0")]
    out.update({
        "final_loss": final_loss(logs[0], steps),
        "median_step_s": step_time_s(rec),
        "mean_step_s_log": log_step_time_s(logs[0]),
        "steps_committed": len(acc["steps"]),
        "attempts_not_committed": len(acc["not_committed"]),
        "steps_recomputed_by_survivors": len(survivor_steps) - len(set(survivor_steps)),
        "samples_consumed": len(keys),
        "samples_duplicated": len(keys) - len(set(keys)),
        "samples_lost": position - len(set(keys)) + len(set(keys) - set(epoch)),
    })
    return out


def run_plain(tmp: Path, spec: str, steps: int, kind: str, groups: int, ranks: int) -> dict:
    """The same ranks in one torchrun world, no fault tolerance: the per-step baseline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FT_RECORD_DIR": str(tmp),
           "PYTHONPATH": str(ROOT)}
    p = Procs(tmp, env)
    try:
        log = p.torchrun(kind, FT_DRIVER, args_for(tmp / "run", spec, steps, 20, ft=False, kind=kind, groups=groups),
                         nproc=groups * ranks)
        if p.procs[kind].wait(timeout=600) != 0:
            raise RuntimeError(log.read_text()[-2000:])
    finally:
        p.stop()
    return {"median_step_s": step_time_s(tmp), "mean_step_s_log": log_step_time_s(log),
            "final_loss": final_loss(log, steps)}


def run_elastic(tmp: Path, spec: str, epoch: list[str], steps: int, kill_at: int | None, every: int) -> dict:
    rec = tmp / "rec"
    rec.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ELASTIC_RECORD_DIR": str(rec),
           "PYTHONPATH": str(ROOT), "PRETRAIN_DIST_TIMEOUT_S": "120", "FT_RECORD_DIR": str(rec)}
    from cluster.launch import ELASTIC_RDZV_CONF

    p = Procs(tmp, env)
    args = args_for(tmp / "run", spec, steps, every, ft=False)
    out: dict = {}
    try:
        endpoint = f"127.0.0.1:{free_port()}"
        nodes = []
        for n in (1, 2, 0):  # the host of the rendezvous store (node 0) last, as the elastic test does
            nodes.append(p.torchrun(f"node{n}", ELASTIC_DRIVER, args, nnodes=f"1:{GROUPS}", endpoint=endpoint,
                                    extra=("--max_restarts", "3", "--monitor_interval", "0.2", "--rdzv_conf",
                                           f"is_host={int(n == 0)},{ELASTIC_RDZV_CONF}"),
                                    ELASTIC_STEP_SLEEP_S="0.5"))
        logs = {n: tmp / f"node{n}.log" for n in range(GROUPS)}
        rank0 = lambda: next((n for n, log in logs.items() if "[rank 0] step" in log.read_text()), None)  # noqa: E731
        wait_until(lambda: rank0() is not None, 300, "a first step")
        keep = rank0()  # ranks are numbered in rendezvous order: kill a node that does not log as rank 0
        victim = next(n for n in (2, 1) if n != keep)  # node 0 hosts the rendezvous store: it must survive
        log0 = logs[keep]
        wait_until(lambda: max(losses(log0), default=0) >= kill_at, 300, f"step {kill_at}")
        kill_node(p.procs[f"node{victim}"].pid)
        killed = time.time()
        survivors = [logs[n] for n in range(GROUPS) if n != victim]
        wait_until(lambda: any("with world size 2" in log.read_text() for log in survivors), 180, "resume on 2 nodes")
        resumed_at = time.time()
        log0 = next(log for log in survivors if "with world size 2" in log.read_text())
        text = logs[keep].read_text()
        last_before = max(int(s) for s in re.findall(r"\[rank 0\] step (\d+)/", text))
        resumed = int(re.findall(r"resumed from \S+ \(step (\d+)\) with world size 2", log0.read_text())[-1])
        seen = len(re.findall(r"\[rank 0\] step \d+/", log0.read_text()))
        wait_until(lambda: len(re.findall(r"\[rank 0\] step \d+/", log0.read_text())) > seen, 120,
                   "a step after resume")
        out["kill_to_survivor_step_s"] = time.time() - killed
        out["kill_to_resume_s"] = resumed_at - killed
        out["steps_recomputed_by_survivors"] = last_before - resumed
        new_log = tmp / "node_new.log"
        started = time.time()
        p.torchrun("node_new", ELASTIC_DRIVER, args, nnodes=f"1:{GROUPS}", endpoint=endpoint,
                   extra=("--max_restarts", "3", "--monitor_interval", "0.2", "--rdzv_conf",
                          f"is_host=0,{ELASTIC_RDZV_CONF}"), ELASTIC_STEP_SLEEP_S="0.5")
        try:
            every_log = [*survivors, new_log]
            with3 = lambda: next((log for log in every_log if "with world size 3" in log.read_text()), None)  # noqa: E731
            wait_until(lambda: with3() is not None, 120, "the replacement node in the world")
            step_re = re.compile(r"\[rank 0\] step (\d+)/")
            last = max(int(x) for log in survivors
                       for x in step_re.findall(log.read_text().split("with world size 3")[0]))
            log3 = with3()
            after = len(re.findall(r"\[rank 0\] step \d+/", log3.read_text()))
            wait_until(lambda: len(re.findall(r"\[rank 0\] step \d+/", log3.read_text())) > after, 120,
                       "a step on 3 nodes")
            out["replacement_start_to_first_step_s"] = time.time() - started
            rejoin = int(re.findall(r"resumed from \S+ \(step (\d+)\) with world size 3", log3.read_text())[-1])
            out["steps_recomputed_at_rejoin"] = last - rejoin
            log0 = log3
        except AssertionError as e:  # the run ended before the node joined: say so
            out["replacement_start_to_first_step_s"] = None
            out["replacement_note"] = str(e)
        for name in [f"node{n}" for n in range(GROUPS) if n != victim] + ["node_new"]:
            p.procs[name].wait(timeout=600)
    finally:
        p.stop()
    out["final_loss"] = final_loss(log0, steps)  # rank 0's log at the end of the run
    keys = elastic_keys(rec, steps)
    expected = steps * GROUPS * GROUP_BATCH
    out.update({"samples_consumed": len(keys), "samples_duplicated": len(keys) - len(set(keys)),
                "samples_lost": expected - len(set(keys)) + len(set(keys) - set(epoch))})
    return out


def elastic_keys(rec: Path, steps: int) -> list[str]:
    """What counts under elastic restarts: each attempt's steps up to where the next attempt resumed."""
    attempts = []
    for path in rec.glob("keys.*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        attempts.append((lines[0]["start_step"], lines[1:]))
    starts = sorted({s for s, _ in attempts})
    keys = []
    for start, batches in attempts:
        end = min([s for s in starts if s > start] or [steps])
        keys += [k for i, batch in enumerate(batches) if start + 1 + i <= end for k in batch]
    return keys


def log_step_time_s(log: Path) -> float:
    """Mean seconds per step after the 5th, from rank 0's log lines (1 s resolution, so over many steps)."""
    times = [time.mktime(time.strptime(m.group(1), "%H:%M:%S")) for m in STEP_LINE.finditer(log.read_text())]
    return (times[-1] - times[5]) / max(1, len(times) - 6)


def kill_at_steps(text: str) -> int:
    """The last step rank 0 logged before its first restart."""
    first_attempt = text.split("resumed from")[0]
    return max(int(s) for s in re.findall(r"\[rank 0\] step (\d+)/", first_attempt))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kill-at", type=int, default=30)
    p.add_argument("--every", type=int, default=20, help="checkpoint.every_steps (elastic restart resumes from it)")
    p.add_argument("--dir", default="/tmp/torchft-failover-bench")
    p.add_argument("--only", nargs="*", default=["torchft_clean", "ddp_clean", "torchft_kill", "elastic_kill"],
                   help="scenarios, in order: torchft_clean ddp_clean torchft_kill elastic_kill hsdp_clean "
                        "fsdp_clean hsdp_kill")
    p.add_argument("--repeat", type=int, default=1, help="run the clean scenarios this often, interleaved")
    p.add_argument("--out", default=str(ROOT / "bench/results/torchft_failover_cpu.json"))
    a = p.parse_args()
    root = Path(a.dir)
    subprocess.run(["rm", "-rf", str(root)], check=True)
    spec, epoch = write_epoch(root / "data", SAMPLES, 100)
    results: dict = {}
    load_before = os.getloadavg()
    clean = [n for n in a.only if n.endswith("_clean")]
    order = clean * a.repeat + [n for n in a.only if not n.endswith("_clean")]  # clean runs interleaved
    for i, name in enumerate(order):
        t0 = time.time()
        tmp = root / f"{name}_{i}"
        tmp.mkdir(parents=True)
        kill = a.kill_at if name.endswith("kill") else None
        prefix = name.split("_")[0]
        kind, groups, ranks = SETUPS[prefix]
        try:
            if prefix in ("torchft", "hsdp"):
                run = run_torchft(tmp, spec, epoch, a.steps, kill, kind, groups, ranks)
            elif prefix == "elastic":
                run = run_elastic(tmp, spec, epoch, a.steps, kill, a.every)
            else:
                run = run_plain(tmp, spec, a.steps, kind, groups, ranks)
        except (RuntimeError, AssertionError) as e:  # recorded, not hidden: the other scenarios still run
            run = {"failed": str(e)[:500]}
        run["wall_s"] = time.time() - t0
        run["load_average"] = os.getloadavg()
        print(name, json.dumps(run), flush=True)
        results.setdefault(name, []).append(run)
    for name, runs in results.items():
        steps_s = [r["median_step_s"] for r in runs if "median_step_s" in r]
        results[name] = runs[0] if len(runs) == 1 else {
            "median_step_s": statistics.median(steps_s) if steps_s else None, "runs": runs}
    for ft, plain in (("torchft_clean", "ddp_clean"), ("hsdp_clean", "fsdp_clean")):
        if results.get(ft, {}).get("median_step_s") and results.get(plain, {}).get("median_step_s"):
            results[f"{ft}_over_{plain}"] = results[ft]["median_step_s"] / results[plain]["median_step_s"]
    import torchft

    report = {
        "bench": "torchft_failover",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo, loopback",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "torchft": torchft.__version__
                     if hasattr(torchft, "__version__") else "0.2.0"},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "setup": {"scenarios": {n: dict(zip(("engine", "groups", "ranks_per_group"), SETUPS[n.split("_")[0]]))
                                for n in a.only},
                  "group_batch": GROUP_BATCH, "steps": a.steps, "kill_at": a.kill_at, "checkpoint_every": a.every,
                  "repeat": a.repeat, "model": "mixer_p4_32", "command": " ".join(sys.argv)},
        "goals": {"survivors_step_again_s": "<= 5", "steps_recomputed_by_survivors": 0,
                  "samples_lost_or_duplicated": 0, "replacement_joins_s": "<= 30"},
        "results": results,
    }
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
