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
