"""Evaluators come from the config's eval sections through the registry, not from a list in build.py."""
import contextlib
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from data_pipeline.storage import Storage
from pretrain import build
from pretrain.config import ConfigError, EvalConfig, load_config
from pretrain.dist import DistInfo
from pretrain.evaluation import EVALUATORS, FewShotEvaluator, LinearProbeEvaluator, UpstreamEvaluator, register
from tests.conftest import ROOT


def evaluators_of(cfg):
    return build.build_evaluators(cfg, CPU, contextlib.nullcontext, Storage())

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def demo_config(*overrides):
    return load_config(str(ROOT / "configs/demo.yaml"),
                       ["data.root=/nonexistent/demo", "model.num_classes=64", *overrides])


def test_every_eval_section_of_the_schema_has_a_builder():
    sections = [f.name for f in dataclasses.fields(EvalConfig)
                if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())]
    assert sections == ["upstream", "fewshot", "linear_probe", "finetune"]
    assert set(sections) == set(EVALUATORS)


def test_enabled_sections_are_built_in_config_order_and_the_flags_still_switch_them():
    evaluators = evaluators_of(demo_config())
    assert [type(e) for e in evaluators] == [UpstreamEvaluator, FewShotEvaluator, LinearProbeEvaluator]
    assert evaluators[1].cache is evaluators[2].cache  # few-shot and probe on one split share its features
    off = evaluators_of(demo_config("eval.fewshot.enabled=false", "data.val=''"))
    assert [type(e) for e in off] == [LinearProbeEvaluator]  # no data.val: no upstream even when enabled


def test_a_new_evaluator_is_a_builder_and_a_section_and_an_unknown_section_is_one_line():
    cfg = demo_config("eval.fewshot.enabled=false", "eval.linear_probe.enabled=false")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # open the schema to a new section, as a
    cfg.eval.custom = {"enabled": True, "metric": "ones"}  # new dataclass section in pretrain/config.py does
    with pytest.raises(ConfigError) as err:
        evaluators_of(cfg)
    assert str(err.value) == ("'eval.custom' names no evaluator; registered: "
                              "fewshot, finetune, linear_probe, upstream")

    class Constant:
        name = "custom"

        def __init__(self, metric):
            self.metric = metric

    register("custom")(lambda section, ctx: Constant(section.metric))
    try:
        with pytest.raises(ValueError, match="registered twice"):
            register("custom")(lambda section, ctx: None)
        evaluators = evaluators_of(cfg)
        assert [type(e) for e in evaluators] == [UpstreamEvaluator, Constant] and evaluators[1].metric == "ones"
        cfg.eval.custom.enabled = False
        assert [type(e) for e in evaluators_of(cfg)] == [UpstreamEvaluator]
    finally:
        del EVALUATORS["custom"]


def test_an_unknown_eval_section_in_a_config_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match="unknown key 'eval.fewshoot'") as err:
        demo_config("eval.fewshoot.enabled=true")
    assert "\n" not in str(err.value)
