"""What a run reads is checked at start, before the engine is built: every data path (training, data.val,
each enabled evaluator's splits; placeholders too) and the class count (model.num_classes auto / given)."""
import pytest

from data_pipeline.errors import DataSpecError
from data_pipeline.storage import Storage
from pretrain.build import check_data, resolve_num_classes
from pretrain.config import ConfigError, load_config
from tests.conftest import ROOT, run_main, tiny_args

DEMO = str(ROOT / "configs/demo.yaml")


def demo_cfg(demo_root, *overrides):
    return load_config(DEMO, [f"data.root={demo_root}", *overrides])


def test_the_demo_data_passes(demo_root):
    check_data(demo_cfg(demo_root), Storage(), DEMO)


@pytest.mark.parametrize("key", ["data.val", "eval.fewshot.train", "eval.fewshot.test", "eval.linear_probe.test"])
def test_a_missing_eval_path_is_one_line_naming_its_key(demo_root, tmp_path, key):
    missing = tmp_path / "nowhere" / "x.json"
    with pytest.raises(DataSpecError) as e:
        check_data(demo_cfg(demo_root, f"{key}={missing}"), Storage(), DEMO)
    assert str(e.value) == f"{key}: manifest {str(missing)!r} not found"


def test_a_missing_shard_behind_a_brace_pattern_names_its_key(demo_root, tmp_path):
    with pytest.raises(DataSpecError, match=r"^eval\.fewshot\.test: .*x-000\.tar: first shard of .* not found$"):
        check_data(demo_cfg(demo_root, f"eval.fewshot.test={tmp_path}/x-{{000..003}}.tar"), Storage(), DEMO)


def test_paths_of_disabled_evaluators_are_not_read(demo_root, tmp_path):
    check_data(demo_cfg(demo_root, f"eval.finetune.train={tmp_path}/no.json",  # finetune: off in the demo
                        "eval.upstream.enabled=false", f"data.val={tmp_path}/no.json"), Storage(), DEMO)
    check_data(demo_cfg(demo_root, "eval.mode=none", f"data.val={tmp_path}/no.json"), Storage(), DEMO)


def test_a_placeholder_left_in_place_is_one_line(demo_root):
    placeholder = "s3://your-bucket/imagenet21k/val.json"
    with pytest.raises(DataSpecError) as e:
        check_data(demo_cfg(demo_root, f"data.val={placeholder}"), Storage(), "configs/h14.yaml")
    assert str(e.value) == f"data.val is still the placeholder {placeholder!r} in configs/h14.yaml; " \
                           "set it or set data.val=''"


def test_num_classes_auto_comes_from_the_manifest(demo_root):
    cfg = demo_cfg(demo_root)
    assert cfg.model.num_classes == "auto"
    assert resolve_num_classes(cfg, Storage(), DEMO).model.num_classes == 64  # the glyph classes
    assert resolve_num_classes(demo_cfg(demo_root, "model.num_classes=64"), Storage(), DEMO).model.num_classes == 64


def test_num_classes_given_against_the_manifest_is_one_line(demo_root):
    with pytest.raises(ConfigError) as e:
        resolve_num_classes(demo_cfg(demo_root, "model.num_classes=21843"), Storage(), DEMO)
    assert str(e.value) == (f"{DEMO}: 'model.num_classes' is 21843 but the manifest of data.train has 64 classes; "
                            "set model.num_classes=64 or model.num_classes=auto")


def test_a_run_with_a_wrong_eval_path_stops_before_the_engine(tmp_path, demo_root):
    missing = tmp_path / "nowhere" / "digits.json"
    r = run_main(tiny_args(tmp_path / "run", demo_root, 4, 2, f"eval.linear_probe.train={missing}"), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: eval.linear_probe.train: manifest {str(missing)!r} not found"], r.stderr[-2000:]
    # Nothing of the run written: no config, no checkpoint (the run-dir lease may have come and gone).
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()
