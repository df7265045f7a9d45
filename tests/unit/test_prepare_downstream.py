"""The downstream preparer on small files laid out exactly like the official datasets."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from data_pipeline.prepare_downstream import main, prepare
from data_pipeline.shards.manifest import read_manifest
from data_pipeline.storage import Storage


def read_samples(manifest_url):
    """{key: (image HWC uint8, label)} of a written split."""
    out = {}
    for shard in read_manifest(manifest_url, Storage())["shards"]:
        with tarfile.open(shard["url"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in files.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                out[key] = (np.asarray(Image.open(io.BytesIO(data))), int(files[key + ".cls"]))
    return out


def cifar_rows(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["binary", "python"])
def test_cifar10_both_formats_keep_pixels_and_labels(tmp_path, fmt):
    rng = np.random.default_rng(0)
    # Smooth images (JPEG keeps them within a few levels): a gradient plus a per-image colour.
    base = np.linspace(0, 200, 32, dtype=np.float32)
    imgs = np.stack([np.clip(base[None, :, None] + rng.uniform(0, 50, 3), 0, 255).repeat(32, 0) for _ in range(12)])
    rows = imgs.astype(np.uint8).transpose(0, 3, 1, 2).reshape(12, 3072)  # the format's R, G, B planes
    labels = np.arange(12) % 10
    src = tmp_path / ("cifar-10-batches-bin" if fmt == "binary" else "cifar-10-batches-py")
    src.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        part = slice(2 * i, 2 * i + 2)
        if fmt == "binary":
            records = np.concatenate([labels[part, None].astype(np.uint8), rows[part]], 1)
            (src / f"{name}.bin").write_bytes(records.tobytes())
        else:
            (src / name).write_bytes(pickle.dumps({b"data": rows[part], b"labels": labels[part].tolist()}, protocol=2))
    classes = [f"c{i}" for i in range(10)]
    if fmt == "binary":
        (src / "batches.meta.txt").write_text("\n".join(classes) + "\n\n")
    else:
        (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in classes]}))
    # The archive as downloaded (one folder inside a .tar.gz) works the same as the extracted folder.
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    manifests = prepare("cifar10", str(archive), str(tmp_path / "out"), samples_per_shard=4, storage=Storage())
    assert manifests["train"]["num_samples"] == 10 and manifests["test"]["num_samples"] == 2
    assert manifests["train"]["classes"] == classes
    train = read_samples(str(tmp_path / "out/train.json"))
    got = [train[f"train{i // 2}_{i % 2:05d}"] for i in range(10)]
    for i, (image, label) in enumerate(got):
        assert label == labels[i]
        assert np.abs(image.astype(int) - imgs[i].astype(int)).mean() < 3  # JPEG q95 of a smooth image


def test_cifar_pickle_with_code_is_refused_not_run(tmp_path):
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": [Evil()]}))
    r = main(["cifar10", str(src), str(tmp_path / "out")])
    assert r == 2 and not marker.exists()


def test_pets_and_flowers_layouts_and_a_corrupt_image(tmp_path, capsys):
    rng = np.random.default_rng(1)

    def jpg(path, size=(40, 30)):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)

    pets = tmp_path / "oxford-iiit-pet"
    rows = {"trainval": ["Abyssinian_1 1 1 1", "Abyssinian_2 1 1 1", "beagle_7 2 2 1"],
            "test": ["beagle_8 2 2 1", "Abyssinian_3 1 1 1"]}
    for split, lines in rows.items():
        (pets / "annotations").mkdir(parents=True, exist_ok=True)
        (pets / f"annotations/{split}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            jpg(pets / f"images/{line.split()[0]}.jpg")
    (pets / "images/beagle_8.jpg").write_bytes(b"not a jpeg")
    assert main(["pets", str(pets), str(tmp_path / "pets_out"), "--max-size", "20"]) == 0
    assert "train        3 images, 2 classes" in capsys.readouterr().out
    train = read_samples(str(tmp_path / "pets_out/train.json"))
    assert {k: v[1] for k, v in train.items()} == {"Abyssinian_1": 0, "Abyssinian_2": 0, "beagle_7": 1}
    assert min(train["beagle_7"][0].shape[:2]) == 20  # shrunk to --max-size
    assert read_manifest(str(tmp_path / "pets_out/train.json"), Storage())["classes"] == ["Abyssinian", "beagle"]
    assert list(read_samples(str(tmp_path / "pets_out/test.json"))) == ["Abyssinian_3"]  # the corrupt one skipped

    flowers = tmp_path / "flowers"
    for i in range(1, 7):
        jpg(flowers / f"jpg/image_{i:05d}.jpg")
    savemat(flowers / "imagelabels.mat", {"labels": np.array([[1, 2, 3, 1, 2, 3]])})
    savemat(flowers / "setid.mat",
            {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]), "tstid": np.array([[4, 5, 6]])})
    m = prepare("flowers102", str(flowers), str(tmp_path / "fl_out"), storage=Storage())
    assert {k: v["num_samples"] for k, v in m.items()} == {"train": 2, "val": 1, "test": 3}
    test = read_samples(str(tmp_path / "fl_out/test.json"))
    assert {k: v[1] for k, v in test.items()} == {"image_00004": 0, "image_00005": 1, "image_00006": 2}


def test_missing_files_give_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["pets", str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "annotations/trainval.txt" in err[0]
    assert main(["cifar100", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
