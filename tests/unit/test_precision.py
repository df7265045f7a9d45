"""train.precision auto: bf16 on a GPU that runs it, fp32 on a CPU; throughput printed readably below 1 img/s."""
import logging

import pytest

from pretrain import build
from pretrain.config import load_config
from pretrain.monitor import fmt_rate
from tests.conftest import ROOT


def test_the_model_configs_default_to_auto_and_a_cpu_resolves_it_to_fp32(caplog):
    cfg = load_config(str(ROOT / "configs/s32.yaml"))
    assert cfg.train.precision == "auto"
    with caplog.at_level(logging.INFO, logger="pretrain"):
        resolved = build.resolve_precision(cfg, "cpu", "s32.yaml")
    assert resolved.train.precision == "fp32" and cfg.train.precision == "auto"
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["precision fp32"]  # logged once


def test_auto_on_a_gpu_is_bf16_assumed_where_none_is_visible():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: auto follows it (tests/gpu covers CUDA runs)")
    cfg = load_config(str(ROOT / "configs/s32.yaml"))
    assert build.auto_precision("cuda") == ("bf16", "assumed: a GPU with bf16 support, Ampere or newer")
    assert build.resolve_precision(cfg, "cuda", announce=False).train.precision == "bf16"


def test_an_explicit_choice_stays():
    cfg = load_config(str(ROOT / "configs/s32.yaml"), ["train.precision=fp16"])
    assert build.resolve_precision(cfg, "cpu", announce=False).train.precision == "fp16"


@pytest.mark.parametrize("rate, text", [(1234.4, "1234"), (23.46, "23.5"), (1.0, "1.0"), (0.1234, "0.12"),
                                        (0.0123, "0.012")])
def test_img_per_s_is_readable_at_any_size(rate, text):
    assert fmt_rate(rate) == text
