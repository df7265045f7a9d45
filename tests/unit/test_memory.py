"""The per-device memory estimate against numbers worked out by hand for a tiny Mixer."""
import pytest

from pretrain.memory import activation_elements_per_image, estimate_memory
from pretrain.models.mixer import MlpMixer


@pytest.fixture(scope="module")
def tiny():
    # 8 px, patch 4 -> N = 4 tokens; C = 4; D_S = 0.5 * 4 = 2; D_C = 4 * 4 = 16; 2 blocks; 10 classes.
    return MlpMixer(num_classes=10, img_size=8, patch_size=4, num_blocks=2, embed_dim=4, mlp_ratio=(0.5, 4.0))


def test_hand_count_of_parameters_and_activations(tiny):
    # stem 3*4*4*4 + 4 = 196; per block: norms 2*8, token MLP (4*2+2) + (2*4+4) = 22,
    # channel MLP (4*16+16) + (16*4+4) = 148 -> 186; final norm 8; head 4*10+10 = 50.
    assert sum(p.numel() for p in tiny.parameters()) == 196 + 2 * 186 + 8 + 50 == 626
    # Per block 4*N*C + 2*C*D_S + 2*N*D_C = 64 + 16 + 128 = 208; two blocks 416.
    assert activation_elements_per_image(tiny) == 416
    # Checkpointed: the 2 block inputs (N*C = 16 each) + one block recomputed (208).
    assert activation_elements_per_image(tiny, checkpointing=True) == 2 * 16 + 208


def test_ddp_holds_everything_in_fp32(tiny):
    m = estimate_memory(tiny, engine="ddp", world_size=4, micro_batch_size=8, precision="bf16")
    assert (m.params, m.grads, m.optimizer, m.gathered) == (626 * 4, 626 * 4, 626 * 8, 0)
    assert m.activations == 8 * 416 * 2  # bf16 activations
    assert m.total == 626 * 16 + 8 * 416 * 2


def test_fsdp_shards_all_three(tiny):
    m = estimate_memory(tiny, engine="fsdp", world_size=4, micro_batch_size=8, precision="fp32")
    # 626*4 = 2504 B / 4 ranks = 626; Adam 5008 / 4 = 1252; two gathered blocks 2 * 186 * 4 B.
    assert (m.params, m.grads, m.optimizer, m.gathered) == (626, 626, 1252, 2 * 186 * 4)
    assert m.activations == 8 * 416 * 4


@pytest.mark.parametrize("stage, expected", [
    # bf16: weights 2 B, grads 2 B, optimiser 12 B (fp32 master + m + v) per parameter, 2 ranks.
    (1, (626 * 2, 626 * 2, 626 * 12 // 2, 0)),
    (2, (626 * 2, 626 * 2 // 2, 626 * 12 // 2, 0)),
    (3, (626 * 2 // 2, 626 * 2 // 2, 626 * 12 // 2, 2 * 186 * 2)),
])
def test_zero_stages(tiny, stage, expected):
    m = estimate_memory(tiny, engine="deepspeed", world_size=2, micro_batch_size=1, precision="bf16", zero_stage=stage)
    assert (m.params, m.grads, m.optimizer, m.gathered) == expected


def test_offload_moves_optimizer_to_host(tiny):
    m = estimate_memory(tiny, engine="deepspeed", world_size=2, micro_batch_size=1, precision="bf16", zero_stage=2,
                        offload_optimizer=True)
    assert m.optimizer == 0 and m.optimizer_host == 626 * 12 // 2
    assert "host memory" in m.describe()


def test_h14_line_is_printed_in_gib():
    from pretrain.models import create_model
    import torch
    with torch.device("meta"):  # shapes only: no 1.7 GB allocation
        h14 = create_model("mixer_h14_224", num_classes=21843)
    m = estimate_memory(h14, engine="deepspeed", world_size=8, micro_batch_size=32, precision="bf16", zero_stage=3)
    n = sum(p.numel() for p in h14.parameters())
    assert m.params == -(-n * 2 // 8)
    assert "GiB per device" in m.describe()


def test_h14_estimate_is_printed_from_the_command_line(capsys):
    from pretrain.main import main
    from tests.conftest import ROOT
    assert main(["--config", str(ROOT / "configs/h14.yaml"), "--estimate-memory", "64"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("mixer_h14_224 on deepspeed ZeRO-3, 64 ranks, micro batch 64 x 1: ")
    # H/14 at 224 px: N = 256 tokens, C = 1280, D_S = 640, D_C = 5120, 32 blocks, checkpointed:
    # 32 * 256 * 1280 block inputs + one block (4*256*1280 + 2*1280*640 + 2*256*5120 = 5,570,560)
    # = 16,056,320 elements/image x 64 images x 2 B (bf16) = 2,055,208,960 B = 1.91 GiB.
    assert "activations 1.91 " in line and line.endswith("GiB per device")
