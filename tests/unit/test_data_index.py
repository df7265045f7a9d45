"""The indexer: the same counts and byte offsets as the writer records, resumable, one-line errors."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np

from data_pipeline.index import main
from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.shards.manifest import read_manifest
from data_pipeline.storage import Storage


def _shards(root, n=5, per=7):
    jpg = [encode_jpeg(np.random.default_rng(i).integers(0, 255, (10 + i, 9, 3), dtype=np.uint8)) for i in range(3)]
    return write_shards(((f"k{i:03d}", jpg[i % 3], i % 4) for i in range(n * per)), str(root), "train", per,
                        storage=Storage())


def test_index_matches_the_writers_manifest_and_resumes(tmp_path, capsys, caplog):
    written = _shards(tmp_path / "s")
    pattern, out = str(tmp_path / "s" / "train-{000000..000004}.tar"), str(tmp_path / "m.json")
    shutil.move(tmp_path / "s" / "train-000003.tar", tmp_path / "away.tar")
    assert main([pattern, "--out", out, "--threads", "1", "--no-progress"]) == 2  # one thread: shards in order
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: cannot read ") and "train-000003.tar (not found)" in err
    partial = [json.loads(line) for line in open(out + ".partial.jsonl")]
    # The shards finished before the error (and the one running while it was raised) are kept for the rerun.
    assert [p["url"][-9:] for p in partial][:3] == ["00000.tar", "00001.tar", "00002.tar"] and len(partial) <= 4
    # The offsets wait in a local binary file, not in memory or JSON: the indexer grows with shards.
    assert all(set(p["offsets"]) == {"at", "n"} for p in partial)
    shutil.move(tmp_path / "away.tar", tmp_path / "s" / "train-000003.tar")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.index"):
        assert main([pattern, "--out", out, "--threads", "3", "--no-progress"]) == 0
    assert any(f"resuming: {len(partial)} of 5" in r.getMessage() for r in caplog.records)
    indexed = read_manifest(out, Storage(), offsets=True)
    assert [(s["num_samples"], s["offsets"]) for s in indexed["shards"]] == \
        [(s["num_samples"], s["offsets"]) for s in written["shards"]]
    assert indexed["num_samples"] == 35 and indexed["num_classes"] == 4


def test_damaged_shard_keeps_its_complete_samples(tmp_path):
    written = _shards(tmp_path / "s", n=1)
    path = tmp_path / "s" / "train-000000.tar"
    offsets = written["shards"][0]["offsets"]
    cut = (offsets[3] + offsets[4]) // 2  # inside sample 3
    path.write_bytes(path.read_bytes()[:cut])
    assert main([str(path), "--out", str(tmp_path / "m.json"), "--no-progress"]) == 0
    entry = read_manifest(str(tmp_path / "m.json"), Storage(), offsets=True)["shards"][0]
    assert entry["num_samples"] == 3 and entry["offsets"] == offsets[:4]


def test_relative_shard_paths_are_recorded_relative_to_the_manifest(tmp_path, monkeypatch):
    """Paths typed relative to the working directory; the manifest names shards relative to itself (below it)
    or absolute (elsewhere), so any working directory reads the same shards, and a moved folder too."""
    written = _shards(tmp_path / "data" / "s", n=2)
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["data/s/train-{000000..000001}.tar", "--out", "data/m.json", "--no-progress"]) == 0
    assert main(["data/s/train-{000000..000001}.tar", "--out", "other/m.json", "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path / "other")
    beside = read_manifest(str(tmp_path / "data" / "m.json"), Storage())
    assert [s["url"] for s in beside["shards"]] == [str(tmp_path / "data" / "s" / f"train-00000{i}.tar")
                                                    for i in range(2)]
    elsewhere = read_manifest("m.json", Storage())
    assert [s["url"] for s in elsewhere["shards"]] == [str(tmp_path / "data" / "s" / f"train-00000{i}.tar")
                                                       for i in range(2)]
    shutil.move(tmp_path / "data", tmp_path / "moved")
    from data_pipeline.shards.spec import expand_urls
    urls = expand_urls(str(tmp_path / "moved" / "m.json"), Storage())
    assert urls == [str(tmp_path / "moved" / "s" / f"train-00000{i}.tar") for i in range(2)]
    assert read_manifest(str(tmp_path / "moved" / "m.json"), Storage())["num_samples"] == written["num_samples"]
