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


class Skip(str):
    """A SKIP_KINDS entry (compares and indexes as that string) carrying ``detail``: which sample and why,
    for the one line a run that skips too much stops with."""

    detail: str

    def __new__(cls, kind: str, detail: str) -> Skip:
        out = super().__new__(cls, kind)
        out.detail = detail
        return out


def decode_sample(sample: dict[str, Any], image_fn: Callable[[bytes], np.ndarray]) -> tuple[np.ndarray, int] | Skip:
    """``(pixels, label)`` for a raw tar sample, or the SKIP_KINDS entry saying why it is unusable."""
    url, key = sample.get("__url__"), sample.get("__key__")
    if key == SHARD_ERROR_KEY:
        why = sample.get("err", b"").decode(errors="replace")
        if not sample.get("__logged__"):
            log.warning("skipping unreadable shard %s: %s", url, why)
        return Skip("bad_shard", f"{url}: {why}")
    image = next((sample[e] for e in _IMAGE_EXTS if e in sample), None)
    if image is None or "cls" not in sample:
        missing = "image" if image is None else ".cls"
        log.warning("skipping sample %s in %s: missing %s member", key, url, missing)
        return Skip("missing_member", f"sample {key} in {url}: no {missing} member")
    try:
        label = int(sample["cls"].decode("ascii").strip())
        if label < 0:
            raise ValueError("negative")
    except (ValueError, UnicodeDecodeError):
        log.warning("skipping sample %s in %s: bad label %r", key, url, sample["cls"][:20])
        return Skip("bad_label", f"sample {key} in {url}: bad label {sample['cls'][:20]!r}")
    try:
        pixels = image_fn(image)
    except Exception as exn:  # noqa: BLE001 - decoders raise many types for corrupt data; never crash the run
        log.warning("skipping sample %s in %s: undecodable image (%s: %s)", key, url, type(exn).__name__, exn)
        return Skip("bad_image", f"sample {key} in {url}: undecodable image ({type(exn).__name__}: "
                    f"{' '.join(str(exn).split())[:120]})")
    return pixels, label
