"""The synthetic glyph set (the demo's pre-training data)."""
import collections

import numpy as np

from data_pipeline.shards.manifest import read_manifest
from data_pipeline.storage import Storage
from data_pipeline.demo_data.synthetic import (CLASSES, NUM_CLASSES, glyph_strokes, render_batch, render_sample,
                                     write_synthetic_glyphs)


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


def test_glyphs_are_visible_against_the_background():
    # A glyph's pixels must differ clearly from the same image without it, or the labels are noise.
    rng = np.random.default_rng(0)
    for label in range(0, NUM_CLASSES, 4):
        img, _ = render_sample(rng, 32, label)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(float)
        assert img.astype(float).std() > 15, CLASSES[label]
        assert np.abs(img.astype(float) - border.mean(0)).max() > 60, CLASSES[label]


def test_classes_are_distinct_fixed_glyphs():
    # The alphabet does not depend on the data seed, and no two classes share a skeleton.
    skeletons = [np.concatenate(glyph_strokes(c)).round(3).tobytes() for c in range(NUM_CLASSES)]
    assert len(set(skeletons)) == NUM_CLASSES
    assert all(1 <= len(glyph_strokes(c)) <= 3 for c in range(NUM_CLASSES))
    # Two draws of one class look more alike than draws of different classes (on average, as masks).
    rng = np.random.default_rng(3)
    grey = render_batch(rng, [c for c in range(8) for _ in range(20)], 32).mean(-1).reshape(8, 20, -1)
    grey = (grey - grey.mean(-1, keepdims=True)) / (grey.std(-1, keepdims=True) + 1e-6)
    means = grey.mean(1)
    within = np.mean([np.mean((grey[c] - means[c]) ** 2) for c in range(8)])
    between = np.mean([np.mean((grey[c] - means[(c + 1) % 8]) ** 2) for c in range(8)])
    assert within < between


def test_written_set_is_deterministic_and_balanced(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_synthetic_glyphs(str(tmp_path / name), num_train=2 * NUM_CLASSES, num_val=20, image_size=16,
                               samples_per_shard=25, seed=seed, storage=Storage())
    a, b, c = (read_manifest(str(tmp_path / n / "train.json"), Storage()) for n in "abc")
    assert a["num_samples"] == 128 and [s["num_samples"] for s in a["shards"]] == [25] * 5 + [3]
    assert a["classes"] == list(CLASSES) and a["num_classes"] == NUM_CLASSES
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]
    val = read_manifest(str(tmp_path / "a" / "val.json"), Storage())
    assert val["num_samples"] == 20

    import tarfile
    labels = collections.Counter()
    for shard in a["shards"]:
        with tarfile.open(shard["url"]) as tar:
            labels.update(int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls"))
    assert labels == {k: 2 for k in range(NUM_CLASSES)}
