"""The GPU decode path's CPU-testable halves: crop planning from headers and device-side crop/resize/flip.

torchvision (the nvJPEG decoder) is not needed here: images are decoded with PIL and handed to the same
crop/resize/flip code the GPU path runs; tests/gpu covers the CUDA decode where a GPU exists.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.image.gpu_decode import CropPlanner, crop_resize_flip, gpu_decode_available
from data_pipeline.shards.tar_write import encode_jpeg
from data_pipeline.storage import Storage
from data_pipeline.image.transforms import TrainTransform, random_resized_crop_params


def _photo(h=96, w=128):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(xx / 9), 128 + 90 * np.cos(yy / 7), (xx + yy) % 256], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_crop_resize_flip_matches_pil_on_the_same_crop():
    data = encode_jpeg(_photo())
    pil = Image.open(__import__("io").BytesIO(data)).convert("RGB")
    chw = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()
    for seed in range(8):
        rng = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_params(pil.width, pil.height, rng)
        flip = seed % 2
        ref = pil.resize((32, 32), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if flip:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        got = crop_resize_flip([chw], torch.tensor([[top, left, h, w, flip]]), 32)[0].numpy()
        assert got.shape == (32, 32, 3) and got.dtype == np.uint8
        # Same geometry exactly (a wrong crop or flip gives errors of tens); filters differ by rounding only.
        assert np.abs(got.astype(int) - np.asarray(ref, dtype=int)).mean() < 2.0


def test_crop_planner_draws_like_the_cpu_path():
    data = encode_jpeg(_photo(256, 256))
    planner = CropPlanner(TrainTransform(224))
    areas, flips = [], []
    for seed in range(400):
        out, (top, left, h, w, flip) = planner(data, np.random.default_rng(seed))
        assert out is data and 0 <= top <= 256 - h and 0 <= left <= 256 - w
        areas.append(h * w / 256**2)
        flips.append(flip)
    # RandomResizedCrop(0.08, 1): area fraction ~ U(0.08, 1) before the fit test, mean near 0.5.
    assert 0.4 < np.mean(areas) < 0.6 and 0.4 < np.mean(flips) < 0.6


def test_crop_planner_rejects_what_the_decoder_would():
    planner = CropPlanner(TrainTransform(32))
    with pytest.raises(Exception):
        planner(b"not a jpeg", np.random.default_rng(0))


def test_gpu_decode_reports_why_it_is_unavailable_on_cpu():
    assert "not CUDA" in gpu_decode_available(torch.device("cpu"))


def test_loader_in_gpu_mode_ships_jpeg_bytes_and_crops(tmp_path):
    from data_pipeline.shards.tar_write import write_shards
    from data_pipeline.stream.train_loader import TrainLoader

    samples = [(f"k{i:03d}", encode_jpeg(_photo(40 + i, 50)), i % 3) for i in range(24)]
    write_shards(samples, str(tmp_path), "train", 8, storage=Storage())
    loader = TrainLoader(str(tmp_path / "train.json"), batch_size=6, transform=CropPlanner(TrainTransform(16)),
                         seed=0, num_workers=0, shuffle_buffer=8, storage=Storage())
    batch = next(iter(loader))
    assert batch.images.shape == (0, 16, 16, 3) and batch.crops.shape == (6, 5) and len(batch.encoded) == 6
    by_key = dict((k, d) for k, d, _ in samples)
    for key, enc in zip(batch.keys, batch.encoded):
        assert bytes(enc.numpy()) == by_key[key]
    decoded = [torch.from_numpy(np.array(Image.open(__import__("io").BytesIO(bytes(e.numpy())))))
               .permute(2, 0, 1) for e in batch.encoded]
    assert crop_resize_flip(decoded, batch.crops, 16).shape == (6, 16, 16, 3)
