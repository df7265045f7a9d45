"""The demo's pre-training set: ten synthetic shape classes on noisy, smoothly coloured backgrounds.

Shapes vary in size, position, colour, line width and (for triangles and diagonals) orientation, so a
model has to learn strokes, corners and curvature rather than a colour or a pixel position; those
stroke features are what the downstream handwritten-digit task (``digits.py``) needs.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.shards import encode_jpeg, write_shards

CLASSES = ("disc", "ring", "square", "hollow_square", "triangle", "plus", "cross", "hbar", "vbar", "diagonal")
_SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down: anti-aliased edges at little cost
_SPLIT_TAGS = {"train": 0, "val": 1}
_CHUNK = 256  # images rendered per vectorised call; part of the definition of the data set (fixes rng use)  # separate random streams, so train and val never share an image


@lru_cache(maxsize=32)
def _interpolation(size: int, k: int) -> np.ndarray:
    """(size, k) linear-interpolation weights from k evenly spaced control points to size pixels."""
    pos = np.linspace(0.0, k - 1.0, size)
    lower = np.minimum(np.floor(pos).astype(int), k - 2)
    frac = pos - lower
    weights = np.zeros((size, k), np.float32)
    weights[np.arange(size), lower] = 1.0 - frac
    weights[np.arange(size), lower + 1] = frac
    return weights


def _backgrounds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """n smooth colour fields (tiny random grids, bilinearly upsampled) plus pixel noise, float32 NHWC."""
    ks = rng.integers(2, 5, n)  # control grid 2x2 .. 4x4: from gentle gradients to blotchy
    out = np.empty((n, size, size, 3), np.float32)
    for k in (2, 3, 4):
        idx = np.flatnonzero(ks == k)
        if idx.size:
            grid = rng.uniform(0.0, 255.0, (idx.size, k, k, 3)).astype(np.float32)
            w = _interpolation(size, k)
            # Separable upsampling as two matrix products: cheap, and vectorised over images.
            out[idx] = np.einsum("ik,nklc,jl->nijc", w, grid, w, optimize=True)
    sigma = rng.uniform(0.0, 24.0, n).astype(np.float32)
    out += rng.standard_normal((n, size, size, 3), dtype=np.float32) * sigma[:, None, None, None]
    return out


def _shape_mask(label: int, size: int, p: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] (HxW float32) of the class-``label`` shape; ``p`` holds 6 uniforms in [0, 1)."""
    s = size * _SUPERSAMPLE
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    r = (0.2 + 0.22 * p[0]) * s  # half extent: 20-42 % of the image
    cx, cy = r + (s - 2 * r) * p[1], r + (s - 2 * r) * p[2]
    width = max(2 * _SUPERSAMPLE, int(round((0.07 + 0.09 * p[3]) * s)))
    box = (cx - r, cy - r, cx + r, cy + r)
    name = CLASSES[label]
    if name == "disc":
        draw.ellipse(box, fill=255)
    elif name == "ring":
        draw.ellipse(box, outline=255, width=width)
    elif name == "square":
        draw.rectangle(box, fill=255)
    elif name == "hollow_square":
        draw.rectangle(box, outline=255, width=width)
    elif name == "triangle":
        theta = 2 * math.pi * p[4]
        draw.polygon([(cx + r * math.cos(theta + k * 2 * math.pi / 3), cy + r * math.sin(theta + k * 2 * math.pi / 3))
                      for k in range(3)], fill=255)
    elif name == "plus":
        draw.line([(cx - r, cy), (cx + r, cy)], fill=255, width=width)
        draw.line([(cx, cy - r), (cx, cy + r)], fill=255, width=width)
    elif name == "cross":
        a = r * 0.8
        draw.line([(cx - a, cy - a), (cx + a, cy + a)], fill=255, width=width)
        draw.line([(cx - a, cy + a), (cx + a, cy - a)], fill=255, width=width)
    elif name == "hbar":
        draw.line([(cx - r, cy), (cx + r, cy)], fill=255, width=width)
    elif name == "vbar":
        draw.line([(cx, cy - r), (cx, cy + r)], fill=255, width=width)
    else:  # diagonal: one stroke at 45 or 135 degrees, +-15 degrees
        phi = math.radians((45.0 if p[5] < 0.5 else 135.0) - 15.0 + 30.0 * p[4])
        dx, dy = r * math.cos(phi), r * math.sin(phi)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def _contrasting_colours(rng: np.random.Generator, backgrounds: np.ndarray) -> np.ndarray:
    """Per image a random colour clearly distinct from its background's mean, so every sample is solvable."""
    mean = backgrounds.mean(axis=(1, 2))  # (n, 3)
    candidates = rng.uniform(0.0, 255.0, (len(mean), 16, 3)).astype(np.float32)
    far = np.square(candidates - mean[:, None, :]).sum(-1) > 120.0**2  # (n, 16)
    first = far.argmax(axis=1)
    chosen = candidates[np.arange(len(mean)), first]
    return np.where(far.any(axis=1)[:, None], chosen, 255.0 - mean)


def render_batch(rng: np.random.Generator, labels: Sequence[int], image_size: int) -> np.ndarray:
    """Images (NHWC uint8 RGB) of the given classes; all randomness comes from ``rng``."""
    n = len(labels)
    backgrounds = _backgrounds(rng, n, image_size)
    params = rng.random((n, 6))
    alpha = np.stack([_shape_mask(int(label), image_size, p) for label, p in zip(labels, params)])[..., None]
    colours = _contrasting_colours(rng, backgrounds)[:, None, None, :]
    # In-place blend and rounding: these arrays are the bulk of the cost, so avoid temporaries.
    images = backgrounds
    images += alpha * (colours - images)
    images += 0.5
    return np.clip(images, 0, 255, out=images).astype(np.uint8)


def render_sample(rng: np.random.Generator, image_size: int, label: int | None = None) -> tuple[np.ndarray, int]:
    """One image (HWC uint8 RGB) and its class index; ``label=None`` draws the class from ``rng``."""
    if label is None:
        label = int(rng.integers(len(CLASSES)))
    return render_batch(rng, [label], image_size)[0], label


def _samples(n: int, image_size: int, seed: int, split: str) -> Iterator[tuple[str, bytes, int]]:
    rng = np.random.default_rng([seed, _SPLIT_TAGS[split]])
    for start in range(0, n, _CHUNK):
        # Cycling labels gives exact class balance; pixel content comes only from rng.
        labels = [i % len(CLASSES) for i in range(start, min(n, start + _CHUNK))]
        for offset, image in enumerate(render_batch(rng, labels, image_size)):
            yield f"{start + offset:08d}", encode_jpeg(image), labels[offset]


def write_synthetic_shapes(out_url: str, *, num_train: int, num_val: int, image_size: int = 32,
                           samples_per_shard: int, seed: int) -> None:
    """Write ``train`` and ``val`` shards (+ manifests with class names) of the shapes set to ``out_url``."""
    for split, n in (("train", num_train), ("val", num_val)):
        write_shards(_samples(n, image_size, seed, split), out_url, split, samples_per_shard, classes=list(CLASSES))
