"""Reaching data URLs: the :class:`Storage` handle (fsspec per scheme) and the one retry layer."""
from data_pipeline.storage.handle import Storage
from data_pipeline.storage.retry import (RetryBudget, RetryInterrupted, StorageError, exists, interrupt_retries_when,
                                        is_outage, one_budget_per_store, permanent_reason, read_range)

__all__ = ["RetryBudget", "RetryInterrupted", "Storage", "StorageError", "exists", "interrupt_retries_when",
           "is_outage",
           "one_budget_per_store", "permanent_reason", "read_range"]
