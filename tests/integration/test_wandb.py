"""monitor.wandb: Weights & Biases beside TensorBoard, run in W&B's offline mode (no network). Its offline run
file is read back: the same scalars under the same names and steps as TensorBoard's event file, the run's
config, the evaluation records; a resumed run goes on in the same W&B run. Without the package: one line."""
import json
import os
import struct
import subprocess
import sys

import pytest

from tests.conftest import MAIN, ROOT, tiny_args

pytestmark = pytest.mark.slow


def run_main(args, env):
    env = {**env, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


def wandb_records(path):
    """The records of an offline run file (W&B's leveldb-style log: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the tail of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def history(records):
    """(step, {name: value}) of each logged row, W&B's own keys left out."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row: dict = {}
            for i in r.history.item:
                key, value = ("/".join(i.nested_key) or i.key), json.loads(i.value_json)
                if key.startswith("eval/records/"):  # a table is logged as its fields (a file and its shape)
                    row.setdefault("eval/records", {})[key[len("eval/records/"):]] = value
                elif not key.startswith("_"):
                    row[key] = value
            rows.append((row.pop("step"), row))
    return rows


def tensorboard_scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_offline_run_has_tensorboards_scalars_the_config_and_the_evaluations_and_resumes(tmp_path, demo_root):
    pytest.importorskip("wandb", reason="the optional extra wandb is not installed (pip install '.[wandb]')")
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir),
           "WANDB_SILENT": "true", "WANDB_PROJECT": "mixer-test"}
    args = tiny_args(run_dir, demo_root, 4, 4, "monitor.wandb=true", "monitor.wandb_name=tiny",
                     "train.log_every=2", "eval.fewshot.enabled=false")
    r = run_main(args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    files = sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1, list(wandb_dir.rglob("*"))
    records = wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_id, run.project, run.display_name) == (run_id, "mixer-test", "tiny")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["model"]["name"] == "mixer_p4_32" and config["train"]["steps"] == 4
    assert config["train"]["precision"] == "fp32" and config["monitor"]["wandb"] is True
    # Every TensorBoard scalar, under its name and step, and nothing W&B has that TensorBoard lacks.
    logged = {(step, k): v for step, row in history(records) for k, v in row.items() if k != "eval/records"}
    tb = tensorboard_scalars(run_dir / "tb")
    assert set(logged) == set(tb), set(logged) ^ set(tb)
    assert all(logged[k] == pytest.approx(tb[k], rel=1e-6) for k in tb)
    assert {(4, "train/loss"), (0, "eval/upstream/top1"), (4, "eval/upstream/top1")} <= set(tb)
    # The evaluation records: their metrics in the summary, their rows in the eval/records table.
    tables = [row["eval/records"] for _, row in history(records) if "eval/records" in row]
    assert len(tables) == 2 and tables[-1]["_type"] == "table-file"
    table = json.loads(next(files[0].parent.glob(f"files/{tables[-1]['path']}")).read_text())
    assert table["columns"] == ["step", "checkpoint", "evaluator", "metric", "value", "error"]
    assert {(row[0], row[2], row[3]) for row in table["data"]} >= {(0, "upstream", "top1"), (4, "upstream", "top1")}
    assert "W&B: " in r.stderr.splitlines()[-1]  # the last lines say where the records are

    # A resumed training run logs into the same W&B run, from the step it resumes at.
    r = run_main([*args, "train.steps=6"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2 and (run_dir / "wandb_run_id").read_text().strip() == run_id
    resumed = next(r.run for r in wandb_records(files[-1]) if r.WhichOneof("record_type") == "run")
    assert resumed.run_id == run_id
    steps = [step for step, row in history(wandb_records(files[-1])) if "train/loss" in row]
    assert steps == [6]  # log_every 2 from step 4: step 6 (the last)


def test_monitor_wandb_without_the_package_is_one_line_and_tensorboard_goes_on(tmp_path, demo_root):
    # A directory on sys.path with `wandb = None` in sys.modules is how Python itself reports an absent
    # module (ImportError): set in a sitecustomize, before the run imports anything.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    r = run_main(tiny_args(tmp_path / "run", demo_root, 2, 2, "monitor.wandb=true", "eval.mode=none"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if "monitor.wandb" in line or "W&B" in line]
    assert len(lines) == 1 and "monitor.wandb is true but the wandb package is not installed: pip install" in lines[0]
    assert list((tmp_path / "run/tb").glob("events.out.tfevents.*")) and not (tmp_path / "run/wandb_run_id").exists()


def test_external_evaluation_logs_to_its_own_run_in_the_training_runs_group(tmp_path, demo_root):
    pytest.importorskip("wandb", reason="the optional extra wandb is not installed (pip install '.[wandb]')")
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir),
           "WANDB_SILENT": "true", "WANDB_PROJECT": "mixer-test", "OMP_NUM_THREADS": "1"}
    r = run_main(tiny_args(run_dir, demo_root, 4, 4, "monitor.wandb=true", "monitor.wandb_name=tiny",
                           "eval.mode=external", "eval.fewshot.enabled=false"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "pretrain.evaluate", str(run_dir), "--watch", "--once"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    train_id = (run_dir / "wandb_run_id").read_text().strip()
    eval_id = (run_dir / "wandb_eval_run_id").read_text().strip()
    assert eval_id != train_id
    (path,) = wandb_dir.glob(f"wandb/offline-run-*-{eval_id}/run-{eval_id}.wandb")
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.job_type, run.display_name) == (train_id, "eval", "tiny-eval")
    logged = {(step, k): v for step, row in history(records) for k, v in row.items() if k != "eval/records"}
    tb = tensorboard_scalars(run_dir / "tb")  # the evaluator's TensorBoard scalars: the same names and steps
    assert {(4, "eval/upstream/top1")} <= set(logged) and set(logged) <= set(tb)
    assert all(logged[k] == pytest.approx(tb[k], rel=1e-6) for k in logged)
    assert any("eval/records" in row for _, row in history(records))
    # The training run is in the same group under its own id.
    (train_path,) = wandb_dir.glob(f"wandb/offline-run-*-{train_id}/run-{train_id}.wandb")
    train_run = next(r.run for r in wandb_records(train_path) if r.WhichOneof("record_type") == "run")
    assert (train_run.run_group, train_run.job_type) == (train_id, "train")
