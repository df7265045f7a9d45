"""Global batch given once; micro batch and accumulation derived per world size, or refused in one line."""
import pytest
import torch

from pretrain.build import batch_layout
from pretrain.config import ConfigError, load_config
from pretrain.dist import DistInfo


def world(n):
    return DistInfo(rank=0, world_size=n, local_rank=0, device=torch.device("cpu"))


def cfg(*overrides):
    return load_config(None, ["data.train=x", "train.steps=10", *overrides])


def test_derived_layouts():
    assert batch_layout(cfg("train.global_batch_size=4096"), world(8), "c") == (512, 1)
    assert batch_layout(cfg("train.global_batch_size=4096", "train.micro_batch_size=128"), world(8), "c") == (128, 4)
    assert batch_layout(cfg("train.global_batch_size=4096", "train.grad_accum_steps=2"), world(8), "c") == (256, 2)
    assert batch_layout(cfg("train.global_batch_size=4096", "train.micro_batch_size=64",
                            "train.grad_accum_steps=8"), world(8), "c") == (64, 8)


@pytest.mark.parametrize("overrides, key", [
    (["train.global_batch_size=100"], "train.global_batch_size"),
    (["train.global_batch_size=4096", "train.micro_batch_size=96"], "train.micro_batch_size"),
    (["train.global_batch_size=4096", "train.micro_batch_size=64", "train.grad_accum_steps=4"],
     "train.grad_accum_steps"),
])
def test_impossible_layouts_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        batch_layout(cfg(*overrides), world(8), "configs/x.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("configs/x.yaml")


@pytest.mark.parametrize("override, key", [
    ("engine.kind=fsdb", "engine.kind"), ("engine.deepspeed.zero_stage=4", "engine.deepspeed.zero_stage"),
    ("optim.loss=hinge", "optim.loss"), ("train.spike_factor=0.5", "train.spike_factor"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
])
def test_engine_config_checked_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg(override)
