"""A checkpoint whose files were replaced by pickle payloads (their sha256 updated in metadata.json,
as anyone with write access to the run dir can) never executes them on resume, for every engine:
the resume loads safely or refuses with one line. Each engine trains 2 steps once (one process) and
resumes from every file of its checkpoint tampered in turn (tests/drivers/tamper_resume.py)."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, run_main
from tests.drivers.tamper_resume import Payload, plant

pytestmark = pytest.mark.slow
DRIVER = str(ROOT / "tests/drivers/tamper_resume.py")
ENGINES = {"single": ["engine.kind=ddp"], "fsdp": ["engine.kind=fsdp"],
           "zero2": ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"],
           "zero3": ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"]}
LEFT = {"fsdp": "engine/dcp/.metadata"}  # left planted for the resume through pretrain/main.py
PICKLED = (".pt", ".distcp", ".metadata")  # files the resume must read: each must be refused


def args(run_dir, demo_root, engine):
    return ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={run_dir}", f"data.root={demo_root}",
            "model.name=mixer_p4_32", "train.steps=2", "train.global_batch_size=8", "checkpoint.every_steps=2",
            "train.log_every=1", "optim.warmup_steps=1", "data.num_workers=0", "eval.mode=none", *ENGINES[engine]]


@pytest.fixture(scope="module")
def tampered(tmp_path_factory, demo_root):
    """engine -> (run dir, marker path, [per-case result]); the four drivers run at once."""
    base = tmp_path_factory.mktemp("tamper")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    procs = {}
    for engine in ENGINES:
        marker = base / f"{engine}.pwned"
        leave = ["--leave", LEFT[engine]] if engine in LEFT else []
        cmd = [sys.executable, DRIVER, str(marker), *leave, *args(base / engine, demo_root, engine)]
        procs[engine] = (marker, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True))
    out = {}
    for engine, (marker, proc) in procs.items():
        log, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, log[-3000:]
        results = [json.loads(line[len("TAMPER "):]) for line in log.splitlines() if line.startswith("TAMPER ")]
        out[engine] = (base / engine, marker, results)
    return out


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    """The test's own check: the planted files do execute under a plain unpickler."""
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(1)}, tmp_path / "x.pt")
    plant(tmp_path, "x.pt", str(marker))
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(Payload(str(marker))))
    assert marker.exists()


@pytest.mark.parametrize("engine", list(ENGINES))
def test_planted_payload_never_runs(tampered, engine):
    run_dir, marker, results = tampered[engine]
    names = {r["case"].split("#")[0] for r in results}
    saved = json.loads((run_dir / "pristine/metadata.json").read_text())["files"]
    assert names == set(saved), "every file of the checkpoint was tampered with once"
    for r in results:
        assert not r["marker"], f"{engine}: {r['case']} executed code on resume"
        if r["case"].split("#")[0].endswith(PICKLED):
            assert r["outcome"] == "refused", f"{engine}: {r['case']} was loaded although it holds a payload"
        if r["outcome"] == "refused":
            assert "\n" not in r["message"] and "refusing to resume" in r["message"], r
            if not r["case"].endswith("safetensors"):
                assert "posix.system" in r["message"], r  # names what was refused
    assert not marker.exists()


def test_tampered_fsdp_resume_is_one_line_through_main(tampered, demo_root):
    run_dir, marker, _ = tampered["fsdp"]
    r = run_main(args(run_dir, demo_root, "fsdp") + ["train.steps=3"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "posix.system" in r.stderr
    assert "Traceback" not in r.stderr and not marker.exists()


def test_zero_reshard_reader_refuses_planted_files(tampered, tmp_path):
    """Onto another world size or stage DeepSpeed's files are read by zero_reshard.py instead of
    DeepSpeed: the same payloads are refused there."""
    import shutil

    from pretrain.engines.deepspeed import _load_weights_only
    from pretrain.engines.zero_reshard import read_zero_checkpoint

    run_dir, _, _ = tampered["zero2"]
    marker = tmp_path / "pwned"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        shutil.copytree(run_dir / "pristine/engine/state", tmp_path / name)
        read_zero_checkpoint(str(tmp_path / name), _load_weights_only)  # the pristine files load
        plant(tmp_path / name, name, str(marker))
        with pytest.raises(pickle.UnpicklingError, match="posix.system"):
            read_zero_checkpoint(str(tmp_path / name), _load_weights_only)
    assert not marker.exists()
