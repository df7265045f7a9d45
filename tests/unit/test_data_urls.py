"""Data spec expansion."""
import os

import pytest

from data_pipeline.shards.tar_write import write_shards
from data_pipeline.storage import Storage
from data_pipeline.shards.spec import DataSpecError, expand_urls


def test_brace_pattern():
    assert expand_urls("/d/train-{000000..000002}.tar", Storage()) == [
        "/d/train-000000.tar", "/d/train-000001.tar", "/d/train-000002.tar"]


def test_double_colon_list_and_list_of_specs():
    assert expand_urls("s3://b/a-{0..1}.tar::/x/c.tar", Storage()) == ["s3://b/a-0.tar", "s3://b/a-1.tar", "/x/c.tar"]
    assert expand_urls(["/a-{0..1}.tar", "/b.tar::/c.tar"], Storage()) == ["/a-0.tar", "/a-1.tar", "/b.tar", "/c.tar"]


def test_manifest_path_gives_absolute_shard_urls(tmp_path, monkeypatch):
    write_shards([("k0", b"x", 0), ("k1", b"y", 1), ("k2", b"z", 0)], str(tmp_path), "train", 2, storage=Storage())
    expected = [str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")]
    assert expand_urls(str(tmp_path / "train.json"), Storage()) == expected
    monkeypatch.chdir(tmp_path.parent)  # a relative manifest path still gives cwd-independent urls
    assert expand_urls(os.path.join(tmp_path.name, "train.json"), Storage()) == expected
    assert expand_urls(f"file://{tmp_path}/train.json", Storage()) == [f"file://{u}" for u in expected]
    assert expand_urls([str(tmp_path / "train.json"), "/other.tar"], Storage()) == expected + ["/other.tar"]


@pytest.mark.parametrize("spec", ["", "::", [], ["", " "]])
def test_empty_expansion_is_a_spec_error(spec):
    with pytest.raises(DataSpecError, match="no shard URLs"):
        expand_urls(spec, Storage())


def test_missing_manifest_names_the_spec(tmp_path):
    spec = str(tmp_path / "missing.json")
    with pytest.raises(DataSpecError) as info:
        expand_urls(spec, Storage())
    message = str(info.value)
    assert spec in message and "\n" not in message
    assert isinstance(info.value, ValueError)


def _tars(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"")
    return root


def test_glob_and_folder_give_their_tars_sorted_and_braces_combine_with_a_glob(tmp_path):
    _tars(tmp_path / "a", ["t-2.tar", "t-0.tar", "t-1.tar", "notes.txt"])
    _tars(tmp_path / "b", ["t-0.tar"])
    a = [str(tmp_path / "a" / f"t-{i}.tar") for i in range(3)]
    assert expand_urls(f"{tmp_path}/a/*.tar", Storage()) == a
    assert expand_urls(str(tmp_path / "a"), Storage()) == a
    assert expand_urls(f"{tmp_path}/a/", Storage()) == a
    assert expand_urls(f"{tmp_path}/{{b,a}}/t-[01].tar", Storage()) == [str(tmp_path / "b/t-0.tar"), *a[:2]]
    assert expand_urls(f"file://{tmp_path}/b/*.tar", Storage()) == [f"file://{tmp_path}/b/t-0.tar"]


@pytest.mark.parametrize("part, why", [("nothing-*.tar", "matches no file"), ("empty", "is a folder without .tar"),
                                       ("no-such-folder", "matches no file or folder")])
def test_a_spec_that_matches_nothing_is_one_line_showing_the_accepted_forms(tmp_path, part, why):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSpecError) as info:
        expand_urls(str(tmp_path / part), Storage())
    message = str(info.value)
    assert why in message and "\n" not in message
    for form in ("brace pattern", "{000000..000099}", "glob (train-*.tar)", "folder", "manifest (.json)", "'::'"):
        assert form in message, message


def test_glob_and_folder_on_s3(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    for name in ("d/t-1.tar", "d/t-0.tar", "d/x.json", "d/sub/t-9.tar"):
        fs.pipe(f"{s3_server.bucket}/{name}", b"")
    storage = Storage(s3_endpoint=s3_server.endpoint)
    expected = [s3_server.url("d/t-0.tar"), s3_server.url("d/t-1.tar")]
    assert expand_urls(s3_server.url("d/t-*.tar"), storage) == expected
    assert expand_urls(s3_server.url("d"), storage) == expected
    assert expand_urls(s3_server.url("d/*/*.tar"), storage) == [s3_server.url("d/sub/t-9.tar")]
    with pytest.raises(DataSpecError, match="matches no file; a part is a shard URL, a brace pattern"):
        expand_urls(s3_server.url("d/u-*.tar"), storage)


def test_indexer_writer_and_data_train_take_the_same_forms(tmp_path, capsys):
    import numpy as np

    from data_pipeline.index import main as index_main
    from data_pipeline.shards.tar_write import encode_jpeg
    from data_pipeline.stream.sources import DataSource, resolve_source
    from data_pipeline.write import main as write_main

    jpg = encode_jpeg(np.zeros((9, 9, 3), np.uint8))
    for part in ("p", "q"):
        write_shards([(f"{part}{i}", jpg, i % 2) for i in range(6)], str(tmp_path / part), "train", 2,
                     storage=Storage())
    # the indexer: a glob and a folder
    assert index_main([f"{tmp_path}/p/train-*.tar", "--out", str(tmp_path / "p.json"), "--no-progress"]) == 0
    assert index_main([str(tmp_path / "q"), "--out", str(tmp_path / "q.json"), "--no-progress"]) == 0
    assert "indexed 6 samples in 3 shards" in capsys.readouterr().out
    # the writer's --shards: a folder
    assert write_main(["--shards", str(tmp_path / "q"), "--out", str(tmp_path / "re"), "--samples-per-shard", "4",
                       "--no-progress"]) == 0
    assert "wrote 6 samples in 2 shards" in capsys.readouterr().out
    # data.train: a glob of manifests; a folder of shards is told the indexer command, which takes it
    source = resolve_source(DataSource(f"{tmp_path}/{{p,q}}/train.json"), 0, Storage())
    assert int(source.counts.sum()) == 12 and len(source.urls) == 6
    with pytest.raises(DataSpecError, match=rf"index '{tmp_path}/q' --out manifest.json"):
        resolve_source(DataSource(str(tmp_path / "q")), 0, Storage())
    assert index_main([f"{tmp_path}/nope/*.tar", "--out", str(tmp_path / "n.json"), "--no-progress"]) == 2
    assert "matches no file; a part is a shard URL" in capsys.readouterr().err
