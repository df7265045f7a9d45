"""`python -m pretrain.export`: a checkpoint's weights as safetensors (fp32 / bf16) and as a timm state dict."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pretrain.export import main as export_main
from pretrain.models import create_model
from tests.conftest import ROOT, run_main, tiny_args

pytestmark = pytest.mark.slow


def export(*args: str, capsys=None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it; with capsys, the same main() in this process (no second torch import)."""
    argv = [str(a) for a in args]
    if capsys is None:
        return subprocess.run([sys.executable, "-m", "pretrain.export", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    code = export_main(argv)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_root):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    r = run_main(tiny_args(run_dir, demo_root, 10, 5, "eval.mode=none"))  # the export reads checkpoints only
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_export_newest_checkpoint_fp32_and_bf16(run_dir, tmp_path, capsys):
    saved = load_file(run_dir / "checkpoints/step_0000010/model.safetensors")
    r = export(run_dir, "--out", tmp_path / "out/m.safetensors")
    assert r.returncode == 0, r.stderr
    assert "step 10" in r.stdout
    fp32 = load_file(tmp_path / "out/m.safetensors")
    assert fp32.keys() == saved.keys() and all(torch.equal(fp32[k], saved[k]) for k in saved)
    from safetensors import safe_open
    with safe_open(tmp_path / "out/m.safetensors", "pt") as f:
        assert f.metadata()["step"] == "10" and f.metadata()["model"] == "mixer_p4_32"
        assert f.metadata()["act"] == "gelu"  # the activation is not in the weights: recorded beside them

    r = export(run_dir / "checkpoints/step_0000005", "--out", tmp_path / "m5.safetensors", "--dtype", "bf16",
               capsys=capsys)
    assert r.returncode == 0, r.stderr
    bf16 = load_file(tmp_path / "m5.safetensors")
    older = load_file(run_dir / "checkpoints/step_0000005/model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in bf16.values())
    assert all(torch.equal(bf16[k], older[k].to(torch.bfloat16)) for k in older)
    assert not all(torch.equal(older[k], saved[k]) for k in saved)  # really the step-5 weights


def test_export_timm_state_dict_loads_into_the_model(run_dir, tmp_path, capsys):
    r = export(run_dir, "--out", tmp_path / "mixer.pth", capsys=capsys)
    assert r.returncode == 0, r.stderr
    assert "[timm-pth, fp32]" in r.stdout
    state = torch.load(tmp_path / "mixer.pth", weights_only=True)
    model = create_model("mixer_p4_32", num_classes=state["head.weight"].shape[0])  # the demo's class count
    model.load_state_dict(state, strict=True)  # timm's mlp_mixer names: stem.proj, blocks.N.mlp_tokens, head
    assert {"stem.proj.weight", "blocks.0.mlp_tokens.fc1.weight", "norm.weight", "head.weight"} <= state.keys()


def test_corrupt_or_missing_checkpoint_is_one_line(run_dir, tmp_path, capsys):
    r = export(tmp_path / "nothing", "--out", tmp_path / "x.safetensors", capsys=capsys)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "neither a checkpoint" in r.stderr

    bad = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(bad)], check=True)
    model = bad / "checkpoints/step_0000010/model.safetensors"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    r = export(bad / "checkpoints/step_0000010", "--out", tmp_path / "x.safetensors", capsys=capsys)
    assert r.returncode == 2 and "checksum mismatch" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()
    # From the run dir, the corrupt newest checkpoint is skipped for the previous one.
    r = export(bad, "--print-step", capsys=capsys)
    assert r.returncode == 0 and r.stdout.strip() == "5", r.stderr
    assert json.loads((bad / "checkpoints/step_0000010/metadata.json").read_text())["step"] == 10
    # A checkpoint of another format version is refused like in a resume, directly and from the run dir.
    meta5 = bad / "checkpoints/step_0000005/metadata.json"
    meta5.write_text(json.dumps({**json.loads(meta5.read_text()), "format_version": 1}))
    r = export(bad / "checkpoints/step_0000005", "--out", tmp_path / "x.safetensors", capsys=capsys)
    assert r.returncode == 2 and "format_version 1 != 2" in r.stderr and r.stderr.count("\n") == 1
    r = export(bad, "--print-step", capsys=capsys)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "no valid checkpoint under checkpoints/; skipped: " in r.stderr and "checksum mismatch" in r.stderr


def _timm_or_skip():
    try:
        import timm
    except Exception as e:  # with a CPU torch the index's torchvision does not load, and timm imports it
        pytest.skip(f"timm not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return timm


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_timm_recipe_loads_the_trained_head_for_any_class_count(request, tmp_path, capsys, act):
    """The timm recipe the export prints (the README's) gives our logits in real timm, with the trained
    head of any class count: the demo's 64 classes on a variant timm does not register (built from timm's
    MlpMixer class), and a 7-class gelu_tanh Mixer-S/32 through timm.create_model's pretrained path."""
    timm = _timm_or_skip()
    import functools

    from pretrain.export import timm_recipe
    from pretrain.models.interop import export_timm
    if act == "gelu":  # the CLI on a trained run
        r = export(request.getfixturevalue("run_dir"), "--out", tmp_path / "m.pth", capsys=capsys)
        assert r.returncode == 0, r.stderr
        recipe = next(line for line in r.stdout.splitlines() if line.startswith("timm: "))[len("timm: "):]
        ours = create_model("mixer_p4_32", num_classes=64)
        ours.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    else:  # a tanh model with a 7-class head, through the same recipe function
        ours = create_model("mixer_s32_224", num_classes=7, act="gelu_tanh")
        torch.nn.init.normal_(ours.head.weight)  # a zero head would hide a dropped one
        export_timm(ours, str(tmp_path / "t.safetensors"))
        recipe = timm_recipe("mixer_s32_224", 7, act, str(tmp_path / "t.safetensors"))
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    scope = {"timm": timm, "torch": torch, "functools": functools}
    exec(recipe, scope)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-5)
