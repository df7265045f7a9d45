"""Config loading: shipped files resolve, and every kind of mistake is one line naming key and file."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.models import list_models

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_resolve(path):
    if path.name == "base.yaml":  # base sets no data location; it is only ever included
        cfg = load_config(str(path), ["data.train=x"])
    else:
        cfg = load_config(str(path))
    assert cfg.model.name in list_models()
    assert cfg.train.steps > 0


def test_model_files_override_base():
    cfg = load_config(str(ROOT / "configs/h14.yaml"), ["train.steps=7"])
    assert cfg.model.name == "mixer_h14_224"
    assert cfg.optim.warmup_steps == 10000  # from base.yaml
    assert cfg.train.steps == 7  # command line wins


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, "data: {train: x}\ntrain: {steps: 3}\noptim: {weigth_decay: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg == f"{p}: unknown key 'optim.weigth_decay' (did you mean 'optim.weight_decay'?)"


def test_wrong_type(tmp_path):
    p = write(tmp_path, "data: {train: x}\ntrain: {steps: many}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: bad value for 'train\.steps'"):
        load_config(p)


def test_missing_required_value(tmp_path):
    p = write(tmp_path, "train: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"missing value for 'data\.train'"):
        load_config(p)


def test_bad_choice_and_range(tmp_path):
    p = write(tmp_path, "data: {train: x}\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"'train\.precision' is 'fp8'; choose one of auto, fp32, bf16, fp16"):
        load_config(p, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"'train\.global_batch_size' must be > 0"):
        load_config(p, ["train.global_batch_size=0"])


def test_override_error_names_command_line(tmp_path):
    p = write(tmp_path, "data: {train: x}\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'model.nmae' \(did you mean 'model.name'\?\)$"):
        load_config(p, ["model.nmae=x"])


def test_include_is_relative_and_error_names_included_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "train: {stepz: 3}\n", "sub/inc.yaml")
    p = write(tmp_path, "include: sub/inc.yaml\ndata: {train: x}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(str(tmp_path / "sub/inc.yaml") + ": unknown key 'train.stepz'")


def test_include_cycle(tmp_path):
    write(tmp_path, "include: b.yaml\n", "a.yaml")
    write(tmp_path, "include: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_cli_prints_one_line_for_bad_config(tmp_path):
    p = write(tmp_path, "data: {train: x}\ntrain: {steps: 3}\nengine: {knd: ddp}\n")
    r = subprocess.run([sys.executable, str(ROOT / "pretrain/main.py"), "--config", p, "--print-config"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {p}: unknown key 'engine.knd' (did you mean 'engine.kind'?)"]
    r = subprocess.run([sys.executable, str(ROOT / "pretrain/main.py"), "--config", str(tmp_path / "none.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.yaml'}: config file not found"]


def test_print_config_is_resolved_yaml():
    r = subprocess.run([sys.executable, str(ROOT / "pretrain/main.py"), "--print-config", "train.steps=11"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "steps: 11" in r.stdout
    assert "train: data/demo/shapes/train.json" in r.stdout  # interpolation resolved


def test_data_image_size_alone_sets_the_models_resolution_and_old_configs_load(tmp_path):
    import torch

    from pretrain.build import _create_model

    demo = str(ROOT / "configs/demo.yaml")
    cfg = load_config(demo, ["data.image_size=64", "data.train=x.json"])
    with torch.device("meta"):
        assert tuple(_create_model(cfg, 3, demo).stem.img_size) == (64, 64)  # mixer_t4_32, built at 64 px
    old = tmp_path / "old.yaml"  # a config that sets both keys, agreeing, loads as before
    old.write_text(f"include: {demo}\nmodel:\n  img_size: 48\ndata:\n  image_size: 48\n")
    cfg = load_config(str(old), ["data.train=x.json"])
    with torch.device("meta"):
        assert tuple(_create_model(cfg, 3, str(old)).stem.img_size) == (48, 48)
    with pytest.raises(ConfigError, match=r"^'model.img_size' is 48 \(from .*old.yaml\) but 'data.image_size' is "
                                          r"32 \(from the command line\)"):
        load_config(str(old), ["data.train=x.json", "data.image_size=32"])


def test_num_workers_auto_is_ten_at_most_and_shares_the_cpus_among_local_ranks():
    code = ("import os, sys; os.sched_setaffinity(0, set(list(os.sched_getaffinity(0))[:int(sys.argv[1])])); "
            "from pretrain.config import load_config; from pretrain.build import data_workers; "
            f"cfg = load_config({str(ROOT / 'configs/s32.yaml')!r}, sys.argv[2:]); print(data_workers(cfg))")

    def workers(cpus: int, *overrides: str, local_ranks: int = 1) -> int:
        env = {**os.environ, "LOCAL_WORLD_SIZE": str(local_ranks)}
        r = subprocess.run([sys.executable, "-c", code, str(cpus), "data.train=x.json", *overrides], env=env,
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip().splitlines()[-1])

    assert load_config(str(ROOT / "configs/s32.yaml"), ["data.train=x.json"]).data.num_workers == "auto"
    assert workers(1) == 1  # a 1-core box gets 1 worker, not base.yaml's 10 fighting the step for the core
    if len(os.sched_getaffinity(0)) >= 2:
        assert workers(2) == 2 and workers(2, local_ranks=2) == 1
    assert workers(1, "data.num_workers=3") == 3  # a number is taken as it is
    with pytest.raises(ConfigError, match=r"'data.num_workers' must be auto or a number in \[0, 256\], got 'many'"):
        load_config(str(ROOT / "configs/s32.yaml"), ["data.train=x.json", "data.num_workers=many"])
