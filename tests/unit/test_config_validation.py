"""Every config value is checked at start: a malformed one stops with one line naming the key, the
value, where it came from (the file or the command line) and what is allowed -- never a torch or
numpy error later. Most cases go through `load_config` in-process (what main.py calls); a few
through the real `python pretrain/main.py`."""
import subprocess
from pathlib import Path
import sys

import pytest
from omegaconf import DictConfig, FloatNode, IntegerNode, ListConfig, OmegaConf

from pretrain.config import RULES, Config, ConfigError, DeepSpeedOptions, FSDPOptions, engine_options, load_config
from tests.conftest import MAIN, ROOT

DEMO = str(ROOT / "configs/demo.yaml")

# (command-line override, the key the error must name)
BAD_OVERRIDES = [
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=0.5", "optim.betas"),
    ("optim.label_smoothing=1.5", "optim.label_smoothing"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim=[1,2]", "optim"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.eps=0", "optim.eps"),
    ("optim.end_lr_ratio=2", "optim.end_lr_ratio"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.schedule=step", "optim.schedule"),
    ("optim.loss=hinge", "optim.loss"),
    ("data.std=[0,0,0]", "data.std"),
    ("data.mean=[127.5,127.5]", "data.mean"),
    ("data.mean=[1,2,300]", "data.mean"),
    ("data.crop_fraction=0", "data.crop_fraction"),
    ("data.augment.scale=[1.0,0.1]", "data.augment.scale"),
    ("data.augment.scale=[0,1]", "data.augment.scale"),
    ("data.augment.ratio=[1.5,0.5]", "data.augment.ratio"),
    ("data.augment.mix_prob=1.5", "data.augment.mix_prob"),
    ("data.augment.randaugment_magnitude=31", "data.augment.randaugment_magnitude"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer"),
    ("data.image_size=0", "data.image_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.max_skip_fraction=2", "data.max_skip_fraction"),
    ("data.max_image_pixels=0", "data.max_image_pixels"),
    ("data.train=s4://bucket/train-{0..3}.tar", "data.train"),
    ("data.storage.s3_endpoint=minio:9000", "data.storage.s3_endpoint"),
    ("data.storage.retries=100000", "data.storage.retries"),
    ("data.num_workers=10000", "data.num_workers"),
    ("data.sources=[{train: a.json, weight: -1}]", "data.sources.0.weight"),
    ("data.epoch_mode=exactly", "data.epoch_mode"),
    ("data.label=text:label", "data.label"),
    ("data=5", "data"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate"),
    ("model.num_classes=0", "model.num_classes"),
    ("model.img_size=-32", "model.img_size"),
    ("train.seed=-1", "train.seed"),
    ("train.spike_factor=0.5", "train.spike_factor"),
    ("train.steps=0", "train.steps"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.precision=fp8", "train.precision"),
    ("engine.deepspeed.zero_stage=4", "engine.deepspeed.zero_stage"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("checkpoint.every_minutes=-1", "checkpoint.every_minutes"),
    ("eval.mode=offline", "eval.mode"),
    ("eval.fewshot.shots=[]", "eval.fewshot.shots"),
    ("eval.fewshot.l2_regs=[1,-1]", "eval.fewshot.l2_regs"),
    ("eval.finetune.lr=-0.1", "eval.finetune.lr"),
    ("eval.finetune.time_budget_s=-5", "eval.finetune.time_budget_s"),
    ("run.dir=foo://bucket/run", "run.dir"),
]


def one_error(config, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(config, list(overrides))
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override, key", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_value_on_the_command_line_names_key_and_source(override, key):
    message = one_error(DEMO, [override])
    assert message.startswith("command line: ") and f"'{key}'" in message, message
    assert any(word in message for word in ("must be", "choose one of", "section of keys", "is empty")), message


def test_messages_say_value_and_what_is_allowed():
    assert one_error(DEMO, ["optim.betas=[0.9,1.5]"]) == (
        "command line: 'optim.betas' must be 2 values, each in [0, 1), got [0.9, 1.5]")
    assert one_error(DEMO, ["data.augment.scale=[1.0,0.1]"]) == (
        "command line: 'data.augment.scale' must be [low, high] with low <= high, each in (0, 1], got [1.0, 0.1]")
    assert one_error(DEMO, ["optim=[1,2]"]) == "command line: 'optim' is a section of keys, got [1, 2]"


def config_file(tmp_path, text):
    path = tmp_path / "my.yaml"
    path.write_text(f"include: {DEMO}\n{text}")
    return str(path)


@pytest.mark.parametrize("text, overrides, key, blamed", [
    ("optim: {betas: [0.9, 1.5]}\n", [], "optim.betas", "file"),
    ("optim: [1, 2]\n", [], "optim", "file"),
    ("data: {augment: {scale: [1.0, 0.1]}}\n", ["optim.lr=0.01"], "data.augment.scale", "file"),
    ("optim: {lr: 0.01}\n", ["optim.lr=-1"], "optim.lr", "command line"),
    ("optim: {label_smoothing: 0.1}\n", ["optim.label_smoothing=1.5"], "optim.label_smoothing", "command line"),
])
def test_the_error_blames_whoever_set_the_value(tmp_path, text, overrides, key, blamed):
    path = config_file(tmp_path, text)
    message = one_error(path, overrides)
    assert message.startswith(f"{path if blamed == 'file' else 'command line'}: ") and f"'{key}'" in message


SHIPPED = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml") if p.name != "base.yaml")  # base: included, no data


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: Path(p).stem)
@pytest.mark.parametrize("kind", ["single", "ddp", "fsdp", "deepspeed"])
def test_every_engine_loads_on_every_shipped_config(path, kind):
    """engine.kind=X on the command line: the other engines' sections (h14's ZeRO-3) are ignored."""
    assert load_config(path, [f"engine.kind={kind}"]).engine.kind == kind


def test_engine_options_live_in_their_engines_section():
    h14 = str(ROOT / "configs/h14.yaml")
    options = engine_options(load_config(h14).engine)
    assert isinstance(options, DeepSpeedOptions) and options.zero_stage == 3
    assert engine_options(load_config(h14, ["engine.kind=fsdp"]).engine) == FSDPOptions(reshard_after_forward=True)
    assert engine_options(load_config(h14, ["engine.kind=ddp"]).engine) is None
    assert engine_options(load_config(h14, ["engine.deepspeed.zero_stage=1"]).engine).zero_stage == 1
    fsdp = load_config(DEMO, ["engine.kind=fsdp", "engine.fsdp.reshard_after_forward=false"]).engine
    assert engine_options(fsdp) == FSDPOptions(reshard_after_forward=False)


@pytest.mark.parametrize("old, new", [("zero_stage=3", "deepspeed.zero_stage"),
                                      ("offload_optimizer=true", "deepspeed.offload_optimizer"),
                                      ("reshard_after_forward=false", "fsdp.reshard_after_forward")])
def test_a_flat_engine_key_names_where_it_moved(tmp_path, old, new):
    key = old.split("=")[0]
    assert one_error(DEMO, [f"engine.{old}"]) == f"command line: 'engine.{key}' moved to 'engine.{new}'"
    path = config_file(tmp_path, f"engine: {{{key}: {old.split('=')[1]}}}\n")
    assert one_error(path) == f"{path}: 'engine.{key}' moved to 'engine.{new}'"


def test_a_run_saved_with_flat_engine_keys_is_still_read():
    from pretrain.config import upgrade_saved_config

    text = upgrade_saved_config("engine:\n  kind: deepspeed\n  zero_stage: 3\n  reshard_after_forward: true\n")
    assert OmegaConf.to_container(OmegaConf.create(text)) == {
        "engine": {"kind": "deepspeed", "deepspeed": {"zero_stage": 3}, "fsdp": {"reshard_after_forward": True}}}


def test_a_misspelled_engine_option_is_one_line_with_the_closest_key(tmp_path):
    path = config_file(tmp_path, "engine: {deepspeed: {zero_stag: 3}}\n")
    assert one_error(path) == f"{path}: unknown key 'engine.deepspeed.zero_stag' (did you mean " \
                              "'engine.deepspeed.zero_stage'?)"


def test_command_line_can_repair_a_file_value(tmp_path):
    path = config_file(tmp_path, "optim: {label_smoothing: 1.5}\n")
    assert load_config(path, ["optim.label_smoothing=0.1"]).optim.label_smoothing == 0.1


def _numeric_keys(node, prefix=""):
    for k in node.keys():
        child, key = node._get_node(k), f"{prefix}{k}"
        if isinstance(child, DictConfig):
            yield from _numeric_keys(child, key + ".")
        elif isinstance(child, ListConfig):
            element = child._metadata.element_type
            if element in (int, float):
                yield key
            elif isinstance(element, type) and hasattr(element, "__dataclass_fields__"):
                yield from _numeric_keys(OmegaConf.structured(element), key + ".*.")
        elif isinstance(child, (IntegerNode, FloatNode)):
            yield key


def test_every_numeric_key_has_a_rule():
    """A key added to the schema needs its line in config.RULES (one line: its range)."""
    keys = list(_numeric_keys(OmegaConf.structured(Config)))
    assert len(keys) > 40
    assert [k for k in keys if k not in RULES] == []


def test_shipped_defaults_pass():
    for name in ("demo", "b16", "h14"):
        load_config(str(ROOT / f"configs/{name}.yaml"))


def test_main_prints_at_most_three_lines_naming_the_key(tmp_path):
    """The same errors through the real command line, the processes started at once."""
    bad_file = config_file(tmp_path, "optim: [1, 2]\n")
    runs = [(["--config", bad_file], bad_file, "'optim'"),
            (["--config", DEMO, f"run.dir={tmp_path}/r", "optim.betas=[0.9,1.5]"], "command line", "'optim.betas'"),
            (["--config", DEMO, f"run.dir={tmp_path}/r", "data.std=[0,0,0]"], "command line", "'data.std'")]
    procs = [subprocess.Popen([sys.executable, MAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for args, _, _ in runs]
    for proc, (_, source, key) in zip(procs, runs):
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and 1 <= len(lines) <= 3, err[-2000:]
        assert lines[-1].startswith(f"error: {source}: ") and key in lines[-1], err[-2000:]
