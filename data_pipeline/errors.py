"""Errors raised for bad data specifications."""


class DataSpecError(ValueError):
    """A data spec (URLs, manifest, shard count, resume state) cannot be used; the message says why."""
