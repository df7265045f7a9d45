"""Weight interop: timm-layout files and JAX (vision_transformer / big_vision) .npz checkpoints.

The files are built synthetically with the exact key names and layouts of those projects, and the
logits are compared with reference forwards written here from the state dict alone (torch
functional ops in timm's layout; numpy in NHWC for the JAX layout), not with our modules.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.special import erf

from pretrain.models import create_model
from pretrain.models.interop import (
    CheckpointMismatchError,
    export_jax,
    export_timm,
    load_pretrained,
    read_state_dict,
)

# A small but complete Mixer: 32 px, patch 4 -> 64 tokens, width 64, 2 blocks, 10 classes.
BLOCKS, WIDTH, TOKENS, PATCH, D_S, D_C, CLASSES = 2, 64, 64, 4, 32, 256, 10


def _timm_shapes(classes: int = CLASSES) -> dict[str, tuple[int, ...]]:
    """timm mlp_mixer keys and shapes, written out by hand from timm's module tree."""
    shapes = {"stem.proj.weight": (WIDTH, 3, PATCH, PATCH), "stem.proj.bias": (WIDTH,)}
    for i in range(BLOCKS):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (WIDTH,), p + "norm1.bias": (WIDTH,),
            p + "mlp_tokens.fc1.weight": (D_S, TOKENS), p + "mlp_tokens.fc1.bias": (D_S,),
            p + "mlp_tokens.fc2.weight": (TOKENS, D_S), p + "mlp_tokens.fc2.bias": (TOKENS,),
            p + "norm2.weight": (WIDTH,), p + "norm2.bias": (WIDTH,),
            p + "mlp_channels.fc1.weight": (D_C, WIDTH), p + "mlp_channels.fc1.bias": (D_C,),
            p + "mlp_channels.fc2.weight": (WIDTH, D_C), p + "mlp_channels.fc2.bias": (WIDTH,),
        })
    shapes.update({"norm.weight": (WIDTH,), "norm.bias": (WIDTH,), "head.weight": (classes, WIDTH),
                   "head.bias": (classes,)})
    return shapes


def _random_timm_state_dict(seed: int = 0, classes: int = CLASSES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in _timm_shapes(classes).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.0 / fan_in**0.5 if len(shape) > 1 else 0.1
        t = torch.randn(shape, generator=g) * scale
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            t = 1.0 + t  # LayerNorm scales around 1, but not exactly 1, so a swapped key shows
        sd[k] = t
    return sd


def _timm_reference_logits(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """timm's mlp_mixer forward, from the state dict (NCHW input)."""
    x = F.conv2d(x, sd["stem.proj.weight"], sd["stem.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    for i in range(BLOCKS):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (WIDTH,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6).transpose(1, 2)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp_tokens.fc1.weight"], sd[p + "mlp_tokens.fc1.bias"])),
                     sd[p + "mlp_tokens.fc2.weight"], sd[p + "mlp_tokens.fc2.bias"])
        x = x + y.transpose(1, 2)
        y = F.layer_norm(x, (WIDTH,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp_channels.fc1.weight"], sd[p + "mlp_channels.fc1.bias"])),
                     sd[p + "mlp_channels.fc2.weight"], sd[p + "mlp_channels.fc2.bias"])
        x = x + y
    x = F.layer_norm(x, (WIDTH,), sd["norm.weight"], sd["norm.bias"], eps=1e-6).mean(1)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def _random_jax_params(seed: int = 0) -> dict[str, np.ndarray]:
    """A flax Mixer parameter tree, flattened with '/' as the official .npz files are."""
    rng = np.random.default_rng(seed)

    def dense(prefix: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
        return {f"{prefix}/kernel": (rng.standard_normal((n_in, n_out)) / n_in**0.5).astype(np.float32),
                f"{prefix}/bias": (0.1 * rng.standard_normal(n_out)).astype(np.float32)}

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}/scale": (1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32),
                f"{prefix}/bias": (0.1 * rng.standard_normal(WIDTH)).astype(np.float32)}

    p = {"stem/kernel": (rng.standard_normal((PATCH, PATCH, 3, WIDTH)) / (3 * PATCH * PATCH) ** 0.5).astype(np.float32),
         "stem/bias": (0.1 * rng.standard_normal(WIDTH)).astype(np.float32)}
    for i in range(BLOCKS):
        b = f"MixerBlock_{i}"
        p |= norm(f"{b}/LayerNorm_0") | norm(f"{b}/LayerNorm_1")
        p |= dense(f"{b}/token_mixing/Dense_0", TOKENS, D_S) | dense(f"{b}/token_mixing/Dense_1", D_S, TOKENS)
        p |= dense(f"{b}/channel_mixing/Dense_0", WIDTH, D_C) | dense(f"{b}/channel_mixing/Dense_1", D_C, WIDTH)
    p |= norm("pre_head_layer_norm") | dense("head", WIDTH, CLASSES)
    return p


def _flax_gelu(y: np.ndarray) -> np.ndarray:
    """flax ``nn.gelu`` = ``jax.nn.gelu(approximate=True)``: the tanh form, written out as jax does."""
    return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))


def _erf_gelu(y: np.ndarray) -> np.ndarray:
    return 0.5 * y * (1 + erf(y / np.sqrt(2)))


def _jax_reference_logits(p: dict[str, np.ndarray], images_nhwc: np.ndarray, gelu=_flax_gelu) -> np.ndarray:
    """The flax Mixer's forward in float64 numpy, NHWC as in vit_jax/models_mixer.py (flax's GELU
    unless ``gelu`` says otherwise)."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    n, h, w, c = images_nhwc.shape
    # Conv with kernel = stride = patch, HWIO kernel; then 'n h w c -> n (h w) c'.
    patches = images_nhwc.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("nhwpqc,pqcd->nhwd", patches, p["stem/kernel"]) + p["stem/bias"]
    x = x.reshape(n, -1, WIDTH)

    def layer_norm(v, prefix):
        mu = v.mean(-1, keepdims=True)
        var = v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-6) * p[f"{prefix}/scale"] + p[f"{prefix}/bias"]

    def mlp(v, prefix):
        y = v @ p[f"{prefix}/Dense_0/kernel"] + p[f"{prefix}/Dense_0/bias"]
        return gelu(y) @ p[f"{prefix}/Dense_1/kernel"] + p[f"{prefix}/Dense_1/bias"]

    for i in range(BLOCKS):
        b = f"MixerBlock_{i}"
        y = np.swapaxes(layer_norm(x, f"{b}/LayerNorm_0"), 1, 2)
        x = x + np.swapaxes(mlp(y, f"{b}/token_mixing"), 1, 2)
        x = x + mlp(layer_norm(x, f"{b}/LayerNorm_1"), f"{b}/channel_mixing")
    x = layer_norm(x, "pre_head_layer_norm").mean(1)
    return x @ p["head/kernel"] + p["head/bias"]


def _model(classes: int = CLASSES, act: str = "gelu"):
    return create_model("mixer_p4_32", num_classes=classes, act=act).eval()


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_timm_layout_file_gives_timm_logits(tmp_path, ext):
    sd = _random_timm_state_dict()
    path = tmp_path / f"mixer.{ext}"
    save_file(sd, str(path)) if ext == "safetensors" else torch.save(sd, path)
    model = load_pretrained(_model(), str(path))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _timm_reference_logits(sd, x), rtol=1e-5, atol=1e-5)


def test_timm_pth_nested_and_prefixed_keys_load(tmp_path):
    sd = _random_timm_state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    model = load_pretrained(_model(), str(path))
    for k, v in sd.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_against_real_timm_model_when_importable():
    try:  # the registered variants fix patch_size: timm's class takes any
        from timm.models.mlp_mixer import MlpMixer
    except Exception as e:  # with a CPU torch the index's torchvision does not load, and timm imports it
        pytest.skip(f"timm not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    reference = MlpMixer(num_classes=CLASSES, img_size=32, patch_size=PATCH, num_blocks=BLOCKS, embed_dim=WIDTH).eval()
    sd = _random_timm_state_dict()
    reference.load_state_dict(sd)
    ours = load_pretrained(_model(), reference.state_dict())
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_jax_npz_import_gives_flax_logits(tmp_path):
    params = _random_jax_params()
    path = tmp_path / "imagenet21k_Mixer-P4.npz"
    np.savez(path, **params)
    model = load_pretrained(_model(act="gelu_tanh"), str(path))  # the plain way, as for an official file
    x = _images()
    nhwc = x.permute(0, 2, 3, 1).double().numpy()
    expected = torch.from_numpy(_jax_reference_logits(params, nhwc))
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
    # The tolerance can tell the two GELUs apart: exact GELU misses flax's logits by more than it.
    erf_logits = torch.from_numpy(_jax_reference_logits(params, nhwc, gelu=_erf_gelu))
    assert (erf_logits - expected).abs().max() > 1e-4


def test_jax_npz_refuses_a_model_with_another_activation(tmp_path):
    params = _random_jax_params()
    path = tmp_path / "official.npz"
    np.savez(path, **params)
    with pytest.raises(CheckpointMismatchError) as exc:
        load_pretrained(_model(act="gelu"), str(path))
    msg = _one_line(exc)
    assert str(path) in msg and "act='gelu_tanh'" in msg and "model.act=gelu_tanh" in msg
    # A file declared as trained with exact GELU loads into an exact-GELU model and gives those logits.
    model = load_pretrained(_model(act="gelu"), str(path), npz_act="gelu")
    x = _images()
    expected = _jax_reference_logits(params, x.permute(0, 2, 3, 1).double().numpy(), gelu=_erf_gelu)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


def test_jax_npz_with_params_prefix_loads(tmp_path):
    params = _random_jax_params()
    path = tmp_path / "ckpt.npz"
    np.savez(path, **{f"params/{k}": v for k, v in params.items()})
    model = load_pretrained(_model(act="gelu_tanh"), str(path))
    torch.testing.assert_close(model.head.weight, torch.from_numpy(params["head/kernel"]).t())


# ---------------------------------------------------------------------------------- export
@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_export_is_timm_loadable(tmp_path, ext):
    model = load_pretrained(_model(), _random_timm_state_dict(seed=2))
    path = tmp_path / f"out.{ext}"
    export_timm(model, str(path))
    # What a timm user would do: plain safetensors / torch.load with weights_only.
    sd = load_file(str(path)) if ext == "safetensors" else torch.load(path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == _timm_shapes()
    assert all(v.dtype == torch.float32 for v in sd.values())
    if ext == "safetensors":
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"act": "gelu"}
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(_timm_reference_logits(sd, x), model(x), rtol=1e-5, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_export_jax_round_trip(tmp_path):
    params = _random_jax_params(seed=3)
    src = tmp_path / "in.npz"
    np.savez(src, **params)
    model = load_pretrained(_model(act="gelu_tanh"), str(src))
    out = tmp_path / "out.npz"
    export_jax(model, str(out))
    with pytest.raises(CheckpointMismatchError) as exc:  # flax would run an exact-GELU model's file with tanh
        export_jax(_model(act="gelu"), str(tmp_path / "exact.npz"))
    assert "act='gelu_tanh'" in _one_line(exc) and not (tmp_path / "exact.npz").exists()
    with np.load(out) as back:
        assert sorted(back.files) == sorted(params)
        for k in params:
            np.testing.assert_array_equal(back[k], params[k])


# ---------------------------------------------------------------------------------- transfer
def test_reset_head_for_new_class_count(tmp_path):
    sd = _random_timm_state_dict(classes=CLASSES)
    path = tmp_path / "pre.safetensors"
    save_file(sd, str(path))
    model = create_model("mixer_p4_32", num_classes=5)
    with pytest.raises(CheckpointMismatchError) as exc:
        load_pretrained(model, str(path))
    assert "'head.weight'" in _one_line(exc)
    load_pretrained(model, str(path), reset_head=True)
    assert model.head.out_features == 5 and torch.count_nonzero(model.head.weight) == 0
    torch.testing.assert_close(model.blocks[1].mlp_channels.fc2.weight, sd["blocks.1.mlp_channels.fc2.weight"])


# ---------------------------------------------------------------------------------- bad input
def test_wrong_shape_names_first_mismatching_key(tmp_path):
    sd = _random_timm_state_dict()
    sd["blocks.1.mlp_tokens.fc1.weight"] = torch.zeros(D_S, TOKENS + 1)
    sd["blocks.1.mlp_channels.fc1.weight"] = torch.zeros(D_C + 1, WIDTH)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError) as exc:
        load_pretrained(_model(), str(path))
    msg = _one_line(exc)
    assert str(path) in msg and "'blocks.1.mlp_tokens.fc1.weight'" in msg and "mlp_channels" not in msg
    assert "(32, 65)" in msg and "(32, 64)" in msg


def test_jax_checkpoint_of_another_variant_names_the_key(tmp_path):
    params = _random_jax_params()
    params["MixerBlock_0/token_mixing/Dense_0/kernel"] = np.zeros((TOKENS * 4, D_S), np.float32)
    path = tmp_path / "other.npz"
    np.savez(path, **params)
    with pytest.raises(CheckpointMismatchError) as exc:
        load_pretrained(_model(act="gelu_tanh"), str(path))
    assert "'blocks.0.mlp_tokens.fc1.weight'" in _one_line(exc)


@pytest.mark.parametrize("change, word", [
    (lambda sd: sd.pop("norm.bias"), "missing key 'norm.bias'"),
    (lambda sd: sd.update({"blocks.2.norm1.weight": torch.ones(WIDTH)}), "unexpected key 'blocks.2.norm1.weight'"),
])
def test_missing_and_unexpected_keys(change, word):
    sd = _random_timm_state_dict()
    change(sd)
    with pytest.raises(CheckpointMismatchError) as exc:
        load_pretrained(_model(), sd)
    assert word in _one_line(exc)


def test_unknown_jax_key_is_named(tmp_path):
    params = _random_jax_params() | {"MixerBlock_0/MultiHeadAttention_0/kernel": np.zeros((2, 2), np.float32)}
    path = tmp_path / "vit.npz"
    np.savez(path, **params)
    with pytest.raises(CheckpointMismatchError) as exc:
        read_state_dict(str(path))
    assert "'MixerBlock_0/MultiHeadAttention_0/kernel'" in _one_line(exc)


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("name, payload, word", [
    ("x.pth", b"not a zip or pickle", "cannot read"),
    ("x.safetensors", b"\x00\x01garbage", "cannot read"),
    ("x.npz", b"PK\x03\x04 truncated", "cannot read"),
    ("x.ckpt", b"", "unknown checkpoint format"),
])
def test_unreadable_files_are_one_line(tmp_path, name, payload, word):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ValueError) as exc:
        read_state_dict(str(path))
    msg = _one_line(exc)
    assert word in msg and str(path) in msg


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    buf = io.BytesIO()
    torch.save({"stem.proj.weight": _Evil()}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError) as exc:
        read_state_dict(str(path))
    assert "cannot read" in _one_line(exc)
    assert "pickled code ran" not in capsys.readouterr().out


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        read_state_dict(str(tmp_path / "nope.safetensors"))
    assert "nope.safetensors" in _one_line(exc)
