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


class Skip(str):
    """A SKIP_KINDS entry (compares and indexes as that string) carrying ``detail``: which sample and why,
    for the one line a run that skips too much stops with."""

    detail: str

    def __new__(cls, kind: str, detail: str) -> Skip:
        out = super().__new__(cls, kind)
        out.detail = detail
        return out


def decode_sample(sample: dict[str, Any], image_fn: Callable[[bytes], np.ndarray],
                  label: LabelReader = _CLS) -> tuple[np.ndarray, int] | Skip:
    """``(pixels, label)`` for a raw tar sample, or the SKIP_KINDS entry saying why it is unusable.

    ``label``: where the label is (``data.label``: cls, txt, json:FIELD), class names mapped through the
    manifest's classes."""
    url, key = sample.get("__url__"), sample.get("__key__")
    if key == SHARD_ERROR_KEY:
        why = sample.get("err", b"").decode(errors="replace")
        if not sample.get("__logged__"):
            log.warning("skipping unreadable shard %s: %s", url, why)
        return Skip("bad_shard", f"{url}: {why}")
    image = next((sample[e] for e in _IMAGE_EXTS if e in sample), None)
    if image is None:
        note = members_note(sample)
        log.warning("skipping sample %s in %s: missing image member (%s)", key, url, note)
        return Skip("missing_member", f"sample {key} in {url}: no image member ({note})")
    try:
        y = label(sample)
    except BadLabel as exn:
        log.warning("skipping sample %s in %s: %s", key, url, exn)
        return Skip("bad_label", f"sample {key} in {url}: {exn}")
    if y is None:
        note = members_note(sample)
        log.warning("skipping sample %s in %s: missing label in %s (%s; data.label says where labels are: %s)",
                    key, url, label.source, note, LABEL_FORMS)
        return Skip("missing_member", f"sample {key} in {url}: no label in {label.source} ({note}); "
                    f"data.label says where labels are ({LABEL_FORMS})")
    try:
        pixels = image_fn(image)
    except Exception as exn:  # noqa: BLE001 - decoders raise many types for corrupt data; never crash the run
        log.warning("skipping sample %s in %s: undecodable image (%s: %s)", key, url, type(exn).__name__, exn)
        return Skip("bad_image", f"sample {key} in {url}: undecodable image ({type(exn).__name__}: "
                    f"{' '.join(str(exn).split())[:120]})")
    return pixels, y
