"""Labels no head can take, through pretrain/main.py: the run trains on, counts them as bad_label skips
and saves its checkpoints; before, the first such sample ended the run with a traceback (IndexError in
the loss, ValueError in the worker) and every exact resume met it again."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from webdataset import TarWriter

from data_pipeline.shards.tar_write import encode_jpeg
from tests.conftest import ROOT, run_main

pytestmark = pytest.mark.slow


def test_labels_outside_the_head_are_skipped_and_the_run_finishes(tmp_path):
    rng = np.random.default_rng(0)
    hostile = {"s0005": b"100000", "s0017": "\u00b2".encode(), "s0033": b"9" * 23}
    with TarWriter(str(tmp_path / "t-0.tar")) as w:
        for i in range(64):
            key = f"s{i:04d}"
            w.write({"__key__": key, "jpg": encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                     "cls": hostile.get(key, str(i % 10).encode())})
    # A manifest that says 10 classes, as one written for these shards before they were changed would.
    (tmp_path / "t.json").write_text(json.dumps({"shards": [{"url": "t-0.tar", "num_samples": 64}],
                                                 "num_classes": 10}))
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={tmp_path / 'run'}", "data.prepare=none",
            f"data.train={tmp_path / 't.json'}", "data.val=''", "eval.mode=none", "model.name=mixer_p4_32",
            "model.num_classes=10", "train.steps=8", "train.global_batch_size=16", "train.log_every=4",
            "checkpoint.every_steps=4", "data.num_workers=1", "optim.warmup_steps=2", "data.max_skip_fraction=0.2"]
    r = run_main(args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for key in hostile:
        assert re.search(rf"skipping sample {key} in .*t-0.tar: cls holds", r.stderr), key
    assert (tmp_path / "run" / "checkpoints" / "step_0000008").is_dir()
