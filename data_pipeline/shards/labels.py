"""Where a sample's label is: ``data.label`` / the indexer's ``--label``, one parser for both.

    cls         the ``.cls`` member holds the class index (the writer's layout; the default)
    txt         the ``.txt`` member holds a class name, mapped through the manifest's ``classes``
    json:FIELD  the ``.json`` member's top-level FIELD holds a class index (int) or a class name (str,
                mapped through ``classes``): img2dataset's ``--save_additional_columns '["label"]'``
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

LABEL_FORMS = "cls, txt or json:FIELD"
# The largest class index any reader accepts when the class count is unknown: a batch holds labels as int64,
# and no head has 2^31 classes. Longer digit strings are refused before int() parses them.
MAX_LABEL = 2**31 - 1
_MAX_DIGITS = len(str(MAX_LABEL))


@dataclass(frozen=True)
class LabelSource:
    member: str  # cls | txt | json
    field: str = ""  # json only

    def __str__(self) -> str:
        return f"json:{self.field}" if self.member == "json" else self.member


def parse_label_source(text: str) -> LabelSource:
    """``cls`` / ``txt`` / ``json:FIELD`` -> LabelSource; ``ValueError`` says what is accepted."""
    text = str(text).strip()
    if text in ("cls", "txt"):
        return LabelSource(text)
    if text.startswith("json:") and text[5:].strip():
        return LabelSource("json", text[5:].strip())
    raise ValueError(f"label source {text!r} is not one of {LABEL_FORMS}")


class BadLabel(Exception):
    """The label member is there but holds no usable label; the message says what it holds."""


def raw_label(sample: dict[str, Any], source: LabelSource) -> int | str | None:
    """The sample's label as stored (an index >= 0, or a class name), None when the sample has none
    there (member or field missing); ``BadLabel`` when it holds something else."""
    data = sample.get(source.member)
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadLabel(f"{source.member} member is not UTF-8: {data[:20]!r}") from None
    if source.member == "cls":
        text = text.strip()
        # ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses.
        if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > _MAX_DIGITS:
            raise BadLabel(f"cls holds {data[:24]!r}, not a class index")
        return int(text)
    if source.member == "txt":
        if not text.strip():
            raise BadLabel("empty .txt label")
        return text.strip()
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an int of > 4300 digits, nesting too deep
        raise BadLabel(f".json member is not JSON: {data[:40]!r}") from None
    if not isinstance(record, dict) or source.field not in record or record[source.field] is None:
        return None
    value = record[source.field]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or \
            (isinstance(value, int) and not 0 <= value <= MAX_LABEL) or (isinstance(value, str) and not value.strip()):
        raise BadLabel(f"{source} holds {str(value)[:40]!r}, not a class index >= 0 or a class name")
    return value.strip() if isinstance(value, str) else value


class LabelReader:
    """A sample's class index from ``source``, class names mapped through ``classes`` (a manifest's), checked
    against ``num_classes`` (the manifest's, or the head's: a label outside it would crash the loss)."""

    def __init__(self, source: LabelSource | str, classes: Sequence[str] | None,
                 num_classes: int | None = None) -> None:
        self.source = parse_label_source(source) if isinstance(source, str) else source
        self.classes = list(classes) if classes else None
        self.num_classes = num_classes if isinstance(num_classes, int) and num_classes > 0 else None
        self._bound = min(self.num_classes, MAX_LABEL + 1) if self.num_classes else MAX_LABEL + 1
        self._index: dict[str, int] | None = None

    def __call__(self, sample: dict[str, Any]) -> int | None:
        """The class index, None when the sample has no label there; ``BadLabel`` otherwise."""
        value = raw_label(sample, self.source)
        if value is None:
            return None
        if isinstance(value, int):
            if value >= self._bound:  # raw_label gives ints >= 0 only
                raise BadLabel(f"{self.source} holds the class index {value}, outside the "
                               + (f"{self.num_classes} classes of the manifest and the model head"
                                  if self.num_classes else f"range 0..{MAX_LABEL}"))
            return value
        if self.classes is None:
            raise BadLabel(f"{self.source} holds the class name {value[:40]!r} but the manifest lists no classes: "
                           f"index the shards with --label {self.source}")
        if self._index is None:
            self._index = {c: i for i, c in enumerate(self.classes)}
        if value not in self._index:
            raise BadLabel(f"{self.source} holds {value[:40]!r}, not one of the manifest's {len(self.classes)} classes")
        return self._index[value]
