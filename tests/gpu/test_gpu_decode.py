"""Runs only where CUDA and torchvision's JPEG decoder exist: nvJPEG decode + device crop vs the CPU path."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.image.gpu_decode import CropPlanner, decode_batch, gpu_decode_available
from data_pipeline.shards.tar_write import encode_jpeg
from data_pipeline.image.transforms import TrainTransform

_why = gpu_decode_available(torch.device("cuda")) if torch.cuda.is_available() else "needs a CUDA GPU; none is visible"
pytestmark = pytest.mark.skipif(_why is not None, reason=f"gpu decode unavailable: {_why}")


def test_gpu_decode_matches_the_pil_crop():
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    photo = np.stack([128 + 90 * np.sin(xx / 9), 128 + 90 * np.cos(yy / 7), (xx + yy) % 256], -1).astype(np.uint8)
    data = encode_jpeg(photo)
    planner = CropPlanner(TrainTransform(64))
    planned = [planner(data, np.random.default_rng(s)) for s in range(16)]
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d, _ in planned]
    crops = torch.tensor([c for _, c in planned])
    images, keep = decode_batch(encoded, crops, 64, torch.device("cuda"))
    assert keep.all() and images.shape == (16, 64, 64, 3) and images.is_cuda
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    for img, (top, left, h, w, flip) in zip(images.cpu().numpy(), crops.tolist()):
        ref = pil.resize((64, 64), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if flip:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # nvJPEG's IDCT/upsampling differ from libjpeg's by a few levels; geometry errors would give tens.
        assert np.abs(img.astype(int) - np.asarray(ref, dtype=int)).mean() < 4.0


def test_a_corrupt_jpeg_is_dropped_not_fatal():
    good = encode_jpeg(np.full((32, 32, 3), 100, np.uint8))
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good, good[:2] + b"not a jpeg" * 20, good)]
    crops = torch.tensor([[0, 0, 32, 32, 0]] * 3)
    images, keep = decode_batch(encoded, crops, 16, torch.device("cuda"))
    assert keep.tolist() == [True, False, True] and images.shape[0] == 2
