"""The demo's pre-training set: many classes of procedurally generated stroke glyphs.

Each class is a fixed random glyph of one to three strokes (straight lines, curves, arcs), like
a character of an invented alphabet; every sample draws it again under a random affine map
(rotation, scale, shear, translation), with jittered control points, a random stroke width, random
blur (some glyphs are drawn small and upscaled) and random ink/paper colours and noise.
Telling many such glyphs apart makes a model learn strokes, their ends, crossings and curvature
and where they lie relative to each other: the features that transfer to handwritten characters
(the downstream task in ``digits.py``), which ten coloured geometric shapes did not teach.
The glyphs are random, not digits: no downstream image or template enters pre-training.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage

NUM_CLASSES = 64
CLASSES = tuple(f"glyph_{i:03d}" for i in range(NUM_CLASSES))
_GLYPH_SEED = 20240501  # fixes the alphabet: the same class is the same glyph for every seed and split
_SUPERSAMPLE = 2  # glyphs are drawn at 2x and box-filtered down: anti-aliased edges at little cost
_SPLIT_TAGS = {"train": 0, "val": 1}  # separate random streams, so train and val never share an image
_CHUNK = 256  # images rendered per vectorised call; part of the definition of the data set (fixes rng use)
_NUM_PARAMS = 12  # uniforms drawn per sample


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 9) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


@lru_cache(maxsize=None)
def glyph_strokes(label: int) -> tuple[np.ndarray, ...]:
    """The skeleton of class ``label``: polylines (k x 2 arrays) in [-1, 1]^2, y pointing down."""
    rng = np.random.default_rng([_GLYPH_SEED, label])
    strokes = []
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(3)
        if kind == 0:  # straight line
            pts = rng.uniform(-0.8, 0.8, (2, 2))
            while np.linalg.norm(pts[1] - pts[0]) < 0.6:  # no specks: every stroke is clearly a stroke
                pts = rng.uniform(-0.8, 0.8, (2, 2))
            strokes.append(pts)
        elif kind == 1:  # quadratic curve
            p0, p2 = rng.uniform(-0.8, 0.8, (2, 2))
            while np.linalg.norm(p2 - p0) < 0.6:
                p0, p2 = rng.uniform(-0.8, 0.8, (2, 2))
            strokes.append(_bezier(p0, rng.uniform(-1.0, 1.0, 2), p2))
        else:  # arc of an ellipse, from a quarter to a full loop
            centre = rng.uniform(-0.4, 0.4, 2)
            radii = rng.uniform(0.25, 0.6, 2)
            start, sweep = rng.uniform(0, 2 * math.pi), rng.uniform(0.5 * math.pi, 2 * math.pi)
            t = start + np.linspace(0.0, sweep, 13)
            strokes.append(centre + radii * np.stack([np.cos(t), np.sin(t)], axis=1))
    return tuple(strokes)


def _glyph_mask(label: int, size: int, p: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] (HxW float32) of glyph ``label`` under the pose drawn from uniforms ``p``."""
    # Small glyphs drawn at a low resolution and upscaled are blurry, like scanned or upscaled ink.
    draw_size = size if p[7] < 0.6 else max(8, int(size * (0.3 + 0.5 * p[8])))
    s = draw_size * _SUPERSAMPLE
    angle, scale = (p[0] - 0.5) * 0.7, 0.75 + 0.4 * p[1]
    aspect, shear = 0.8 + 0.4 * p[2], (p[3] - 0.5) * 0.6
    c, si = math.cos(angle), math.sin(angle)
    affine = scale * np.array([[c, -si], [si, c]]) @ np.array([[aspect, shear], [0.0, 1.0 / aspect]])
    shift = (np.array([p[4], p[5]]) - 0.5) * 0.3  # glyphs fill most of the frame, as scanned characters do
    width = max(_SUPERSAMPLE, int(round((0.07 + 0.1 * p[6]) * s)))
    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    offset = 0
    for stroke in glyph_strokes(label):
        pts = stroke + jitter[offset:offset + len(stroke)]
        offset += len(stroke)
        xy = (pts @ affine.T + shift + 1.0) * (s / 2)
        draw.line([tuple(q) for q in xy], fill=255, width=width, joint="curve")
    small = canvas.resize((draw_size, draw_size), Image.Resampling.BOX)
    if draw_size != size:
        small = small.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(small, np.float32) / 255.0


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


def _paper(rng: np.random.Generator, n: int, size: int, p: np.ndarray) -> np.ndarray:
    """n smooth colour fields (a random 3x3 grid, bilinearly upsampled) plus pixel noise, float32 NHWC.
    Mostly dark, so that most glyphs are light ink on dark paper; ``_inks`` keeps the contrast."""
    grid = rng.uniform(0.0, 1.0, (n, 3, 3, 3)).astype(np.float32) * (40.0 + 160.0 * p[:, 9, None, None, None])
    w = _interpolation(size, 3)
    out = np.einsum("ik,nklc,jl->nijc", w, grid, w, optimize=True)
    sigma = (18.0 * p[:, 10]).astype(np.float32)
    out += rng.standard_normal((n, size, size, 3), dtype=np.float32) * sigma[:, None, None, None]
    return out


def _inks(rng: np.random.Generator, paper: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per image an ink colour at least 110 grey levels from its paper's mean: every sample is solvable.
    Grey ink for most images, a random colour for a third of them."""
    mean = paper.mean(axis=(1, 2))  # (n, 3)
    grey = np.repeat(rng.uniform(0.0, 255.0, (len(mean), 16, 1)), 3, axis=2)
    colour = rng.uniform(0.0, 255.0, (len(mean), 16, 3))
    candidates = np.where(p[:, 11, None, None] < 0.35, colour, grey).astype(np.float32)
    far = np.abs(candidates - mean[:, None, :]).mean(-1) > 110.0  # (n, 16)
    chosen = candidates[np.arange(len(mean)), far.argmax(axis=1)]
    return np.where(far.any(axis=1)[:, None], chosen, np.where(mean < 128, 255.0, 0.0))


def render_batch(rng: np.random.Generator, labels: Sequence[int], image_size: int) -> np.ndarray:
    """Images (NHWC uint8 RGB) of the given classes; all randomness comes from ``rng``."""
    n = len(labels)
    params = rng.random((n, _NUM_PARAMS))
    jitter = rng.normal(0.0, 0.05, (n, 64, 2))  # per control point; a glyph has at most 3 x 13 points
    alpha = np.stack([_glyph_mask(int(label) % NUM_CLASSES, image_size, p, j)
                      for label, p, j in zip(labels, params, jitter)])[..., None]
    images = _paper(rng, n, image_size, params)
    inks = _inks(rng, images, params)[:, None, None, :]
    # In-place blend and rounding: these arrays are the bulk of the cost, so avoid temporaries.
    images += alpha * (inks - images)
    images += 0.5
    return np.clip(images, 0, 255, out=images).astype(np.uint8)


def render_sample(rng: np.random.Generator, image_size: int, label: int | None = None) -> tuple[np.ndarray, int]:
    """One image (HWC uint8 RGB) and its class index; ``label=None`` draws the class from ``rng``."""
    if label is None:
        label = int(rng.integers(NUM_CLASSES))
    return render_batch(rng, [label], image_size)[0], label


def _samples(n: int, image_size: int, seed: int, split: str) -> Iterator[tuple[str, bytes, int]]:
    rng = np.random.default_rng([seed, _SPLIT_TAGS[split]])
    for start in range(0, n, _CHUNK):
        # Cycling labels gives exact class balance; pixel content comes only from rng.
        labels = [i % NUM_CLASSES for i in range(start, min(n, start + _CHUNK))]
        for offset, image in enumerate(render_batch(rng, labels, image_size)):
            yield f"{start + offset:08d}", encode_jpeg(image), labels[offset]


def write_synthetic_glyphs(out_url: str, *, storage: Storage, num_train: int, num_val: int, image_size: int = 32,
                           samples_per_shard: int, seed: int) -> None:
    """Write ``train`` and ``val`` shards (+ manifests with class names) of the glyph set to ``out_url``."""
    for split, n in (("train", num_train), ("val", num_val)):
        write_shards(_samples(n, image_size, seed, split), out_url, split, samples_per_shard, classes=list(CLASSES),
                     storage=storage)


write_synthetic_shapes = write_synthetic_glyphs  # the name the first demo used
