"""Reaching data URLs: the :class:`Storage` handle (fsspec per scheme) and the one retry layer."""
from data_pipeline.storage.handle import Storage
from data_pipeline.storage.retry import RetryBudget, StorageError, is_outage, permanent_reason

__all__ = ["RetryBudget", "Storage", "StorageError", "is_outage", "permanent_reason"]
