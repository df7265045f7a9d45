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
        if not text.isdigit():
            raise BadLabel(f"bad label {data[:20]!r}")
        return int(text)
    if source.member == "txt":
        if not text.strip():
            raise BadLabel("empty .txt label")
        return text.strip()
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        raise BadLabel(f".json member is not JSON: {data[:40]!r}") from None
    if not isinstance(record, dict) or source.field not in record or record[source.field] is None:
        return None
    value = record[source.field]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, int) and value < 0) \
            or (isinstance(value, str) and not value.strip()):
        raise BadLabel(f"{source} holds {value!r}, not a class index >= 0 or a class name")
    return value.strip() if isinstance(value, str) else value


class LabelReader:
    """A sample's class index from ``source``, class names mapped through ``classes`` (a manifest's)."""

    def __init__(self, source: LabelSource | str, classes: Sequence[str] | None) -> None:
        self.source = parse_label_source(source) if isinstance(source, str) else source
        self.classes = list(classes) if classes else None
        self._index: dict[str, int] | None = None

    def __call__(self, sample: dict[str, Any]) -> int | None:
        """The class index, None when the sample has no label there; ``BadLabel`` otherwise."""
        value = raw_label(sample, self.source)
        if value is None or isinstance(value, int):
            return value
        if self.classes is None:
            raise BadLabel(f"{self.source} holds the class name {value[:40]!r} but the manifest lists no classes: "
                           f"index the shards with --label {self.source}")
        if self._index is None:
            self._index = {c: i for i, c in enumerate(self.classes)}
        if value not in self._index:
            raise BadLabel(f"{self.source} holds {value[:40]!r}, not one of the manifest's {len(self.classes)} classes")
        return self._index[value]
