"""Bad input stops a run at once with one line naming what is wrong, never a traceback wall."""
import numpy as np
import pytest

from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage
from tests.conftest import ROOT, run_main

pytestmark = pytest.mark.slow


def base_args(run_dir, train_spec):
    return ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={run_dir}", "data.prepare=none",
            f"data.train={train_spec}", "data.val=''", "eval.fewshot.enabled=false", "eval.linear_probe.enabled=false",
            "model.name=mixer_p4_32",
            "train.steps=20", "train.global_batch_size=16", "train.log_every=5", "data.num_workers=0"]


def test_missing_shards_name_the_spec(tmp_path):
    spec = tmp_path / "nowhere" / "train.json"
    r = run_main(base_args(tmp_path / "run", spec))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(spec) in lines[0], r.stderr[-2000:]


def test_too_many_corrupt_samples_stop_the_run(tmp_path):
    rng = np.random.default_rng(0)
    good = encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    # Every 4th sample is a truncated JPEG: 25% bad, far above the 1% default limit.
    samples = [(f"s{i:04d}", good[:40] if i % 4 == 0 else good, i % 10) for i in range(400)]
    manifest = write_shards(samples, str(tmp_path / "shards"), "train", samples_per_shard=100, storage=Storage())
    assert manifest["num_samples"] == 400
    r = run_main(base_args(tmp_path / "run", tmp_path / "shards/train.json"))
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.max_skip_fraction=0.01" in last and "bad_image" in last
    # With a tolerant limit the same data trains to the end.
    ok = run_main(base_args(tmp_path / "run2", tmp_path / "shards/train.json") + ["data.max_skip_fraction=0.5"])
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_image_size_mismatch_is_a_config_error_naming_where_each_came_from(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text(f"include: {ROOT / 'configs/demo.yaml'}\nmodel:\n  img_size: 32\n")
    r = run_main(["--config", str(config), f"run.dir={tmp_path}", "data.image_size=64"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: 'model.img_size' is 32 (from {config}) but 'data.image_size' is 64 (from the command line): the "
        "model is built at the data's resolution; set data.image_size alone (model.img_size: null follows it)"]


def test_shards_without_manifest_is_one_line_giving_the_index_command(tmp_path):
    r = run_main(base_args(tmp_path / "run", tmp_path / "none-{000..003}.tar") + ["data.num_workers=1"])
    assert r.returncode == 2
    spec = str(tmp_path / "none-{000..003}.tar")
    assert r.stderr.strip().splitlines() == [
        f"error: data.train: data spec {spec!r} is not a manifest (.json): training needs each shard's sample "
        f"count; write one with `python -m data_pipeline.index '{spec}' --out manifest.json` and point the data "
        f"spec at it; set data.train to your shards' manifest (.json)"]


def test_deepspeed_fp16_on_cpu_is_one_line(tmp_path, demo_root):
    from tests.conftest import tiny_args

    r = run_main(tiny_args(tmp_path / "run", demo_root, 4, 2, "engine.kind=deepspeed", "train.precision=fp16"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "DeepSpeed's CPU accelerator has no fp16" in r.stderr
    assert "Traceback" not in r.stderr


def test_headline_config_as_shipped_stops_in_seconds_with_one_line(tmp_path):
    """configs/h14.yaml names a placeholder manifest: no counting of 10,240 shards, no retrying of missing
    credentials, one line saying what to set."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import MAIN

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(OMP_NUM_THREADS="1", AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
               AWS_CONFIG_FILE="/nonexistent")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, MAIN, "--config", str(ROOT / "configs/h14.yaml"), f"run.dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    took = time.monotonic() - t0
    assert r.returncode == 2 and took < 60, (took, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: data.train is still the placeholder 's3://your-bucket/imagenet21k/train.json' in "
                     f"{ROOT / 'configs/h14.yaml'}; set data.train to your shards' manifest (.json)"], r.stderr[-2000:]
