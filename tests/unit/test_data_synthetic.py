"""The synthetic shapes set."""
import collections

import numpy as np

from data_pipeline.shards import read_manifest
from data_pipeline.synthetic import CLASSES, render_batch, render_sample, write_synthetic_shapes


def test_render_is_deterministic_and_varied():
    a, la = render_sample(np.random.default_rng(5), 32)
    b, lb = render_sample(np.random.default_rng(5), 32)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert la == lb and np.array_equal(a, b)
    c, _ = render_sample(np.random.default_rng(6), 32, label=la)
    assert not np.array_equal(a, c)
    batch = render_batch(np.random.default_rng(0), list(range(10)) * 3, 24)
    assert batch.shape == (30, 24, 24, 3)
    # Same class, different pose/colours: images of a class are not near-copies of each other.
    assert np.abs(batch[0].astype(int) - batch[10]).mean() > 10


def test_shapes_are_visible_against_the_background():
    # A shape's pixels must differ clearly from the same image without it, or the labels are noise.
    rng = np.random.default_rng(0)
    for label in range(len(CLASSES)):
        img, _ = render_sample(rng, 32, label)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(float)
        assert img.astype(float).std() > 15, CLASSES[label]
        assert np.abs(img.astype(float) - border.mean(0)).max() > 60, CLASSES[label]


def test_written_set_is_deterministic_and_balanced(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_synthetic_shapes(str(tmp_path / name), num_train=60, num_val=20, image_size=16,
                               samples_per_shard=25, seed=seed)
    a, b, c = (read_manifest(str(tmp_path / n / "train.json")) for n in "abc")
    assert a["num_samples"] == 60 and [s["num_samples"] for s in a["shards"]] == [25, 25, 10]
    assert a["classes"] == list(CLASSES) and a["num_classes"] == 10
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]
    val = read_manifest(str(tmp_path / "a" / "val.json"))
    assert val["num_samples"] == 20

    import tarfile
    labels = collections.Counter()
    for shard in a["shards"]:
        with tarfile.open(shard["url"]) as tar:
            labels.update(int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls"))
    assert labels == {k: 6 for k in range(10)}
