"""The data section of the config: new keys load, bad values stop at start with one line naming the key."""
import pytest

from pretrain.config import ConfigError, load_config
from tests.conftest import ROOT

DEMO = str(ROOT / "configs/demo.yaml")


def test_sources_storage_and_augment_keys_load():
    cfg = load_config(DEMO, ["data.train=''", "data.sources=[{train: a.json, weight: 3}, {train: b.json}]",
                             "data.storage.s3_endpoint=http://127.0.0.1:9000", "data.epoch_mode=resampled",
                             "data.decode=gpu", "data.augment.mixup_alpha=0.8", "data.augment.randaugment_ops=2"])
    assert [s.weight for s in cfg.data.sources] == [3.0, 1.0] and cfg.data.storage.s3_anon is False
    assert cfg.data.epoch_mode == "resampled" and cfg.data.decode == "gpu"


@pytest.mark.parametrize("override, key", [
    ("data.augment.mixup_alpha=-1", "data.augment.mixup_alpha"),
    ("data.augment.mix_prob=1.5", "data.augment.mix_prob"),
    ("data.augment.randaugment_magnitude=31", "data.augment.randaugment_magnitude"),
    ("data.storage.retries=-1", "data.storage.retries"),
    ("data.sources=[{train: a.json, weight: 0}]", "data.sources.0.weight"),
    ("data.epoch_mode=exactly", "data.epoch_mode"),
    ("data.decode=tpu", "data.decode"),
    ("data.cache.dir=s3://bucket/cache", "data.cache.dir"),
    ("data.cache.max_bytes=-1", "data.cache.max_bytes"),
])
def test_bad_data_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(DEMO, [override])
    assert "\n" not in str(err.value)


def test_shard_cache_is_off_by_default_and_built_from_its_keys(tmp_path):
    from data_pipeline.errors import DataSpecError
    from pretrain.build import build_shard_cache

    assert build_shard_cache(load_config(DEMO, [])) is None
    cache = build_shard_cache(load_config(DEMO, [f"data.cache.dir={tmp_path}/c", "data.cache.max_bytes=1000"]))
    assert cache.dir == f"{tmp_path}/c" and cache.max_bytes == 1000
    assert build_shard_cache(load_config(DEMO, [f"data.cache.dir={tmp_path}/d"])).max_bytes > 0  # 90% of free
    (tmp_path / "file").write_text("")
    with pytest.raises(DataSpecError, match=r"data\.cache\.dir .*file.* cannot be used") as err:
        build_shard_cache(load_config(DEMO, [f"data.cache.dir={tmp_path}/file/c"]))
    assert "\n" not in str(err.value)
