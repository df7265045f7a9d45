"""One raw tar sample -> (pixels, label), or the reason it is unusable; never an exception."""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from data_pipeline.shards.labels import LABEL_FORMS, BadLabel, LabelReader
from data_pipeline.shards.tar_read import SHARD_ERROR_KEY, members_note

log = logging.getLogger(__name__)

# Why a sample was dropped. The order is part of the saved state format (lists indexed by kind).
SKIP_KINDS = ("bad_image", "bad_label", "missing_member", "bad_shard")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_CLS = LabelReader("cls", None)


def decode_sample(sample: dict[str, Any], image_fn: Callable[[bytes], np.ndarray],
                  label: LabelReader = _CLS) -> tuple[np.ndarray, int] | str:
    """``(pixels, label)`` for a raw tar sample, or the SKIP_KINDS entry saying why it is unusable.

    ``label``: where the label is (``data.label``: cls, txt, json:FIELD), class names mapped through the
    manifest's classes."""
    url, key = sample.get("__url__"), sample.get("__key__")
    if key == SHARD_ERROR_KEY:
        if not sample.get("__logged__"):
            log.warning("skipping unreadable shard %s: %s", url, sample.get("err", b"").decode(errors="replace"))
        return "bad_shard"
    image = next((sample[e] for e in _IMAGE_EXTS if e in sample), None)
    if image is None:
        log.warning("skipping sample %s in %s: missing image member (%s)", key, url, members_note(sample))
        return "missing_member"
    try:
        y = label(sample)
    except BadLabel as exn:
        log.warning("skipping sample %s in %s: %s", key, url, exn)
        return "bad_label"
    if y is None:
        log.warning("skipping sample %s in %s: missing label in %s (%s; data.label says where labels are: %s)",
                    key, url, label.source, members_note(sample), LABEL_FORMS)
        return "missing_member"
    try:
        pixels = image_fn(image)
    except Exception as exn:  # noqa: BLE001 - decoders raise many types for corrupt data; never crash the run
        log.warning("skipping sample %s in %s: undecodable image (%s: %s)", key, url, type(exn).__name__, exn)
        return "bad_image"
    return pixels, y
