"""One raw tar sample -> (pixels, label), or the reason it is unusable; never an exception."""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from data_pipeline.shards.tar_read import SHARD_ERROR_KEY

log = logging.getLogger(__name__)

# Why a sample was dropped. The order is part of the saved state format (lists indexed by kind).
SKIP_KINDS = ("bad_image", "bad_label", "missing_member", "bad_shard")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def decode_sample(sample: dict[str, Any], image_fn: Callable[[bytes], np.ndarray]) -> tuple[np.ndarray, int] | str:
    """``(pixels, label)`` for a raw tar sample, or the SKIP_KINDS entry saying why it is unusable."""
    url, key = sample.get("__url__"), sample.get("__key__")
    if key == SHARD_ERROR_KEY:
        if not sample.get("__logged__"):
            log.warning("skipping unreadable shard %s: %s", url, sample.get("err", b"").decode(errors="replace"))
        return "bad_shard"
    image = next((sample[e] for e in _IMAGE_EXTS if e in sample), None)
    if image is None or "cls" not in sample:
        log.warning("skipping sample %s in %s: missing %s member", key, url, "image" if image is None else ".cls")
        return "missing_member"
    try:
        label = int(sample["cls"].decode("ascii").strip())
        if label < 0:
            raise ValueError("negative")
    except (ValueError, UnicodeDecodeError):
        log.warning("skipping sample %s in %s: bad label %r", key, url, sample["cls"][:20])
        return "bad_label"
    try:
        pixels = image_fn(image)
    except Exception as exn:  # noqa: BLE001 - decoders raise many types for corrupt data; never crash the run
        log.warning("skipping sample %s in %s: undecodable image (%s: %s)", key, url, type(exn).__name__, exn)
        return "bad_image"
    return pixels, label
