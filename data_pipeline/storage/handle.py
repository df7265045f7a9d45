"""The storage handle of data URLs (shards, manifests, demo data): fsspec file systems per scheme.

:class:`Storage` is built once from the config's ``data.storage`` (``pretrain.build.build_storage``; a CLI
without a config builds it from its own flags) and handed to every reader, writer and check of a data URL;
the run dir (checkpoints, TensorBoard, evaluation records) is not a data URL and takes fsspec's settings
from the environment (``AWS_ENDPOINT_URL``, profiles).

Credentials never pass through here as values: s3fs/gcsfs take them from the environment or the
cloud SDK's chain (profiles, instance roles); only the endpoint, profile name and anonymous flag are
configured, and nothing here logs an option value.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol, url_to_fs


@dataclass(frozen=True)
class Storage:
    """How data URLs are reached: what the config says about object storage, as fsspec file systems per scheme.

    Frozen and picklable: DataLoader workers and writer processes receive it whole.
    """

    s3_endpoint: str = ""  # e.g. http://127.0.0.1:9000 for MinIO / moto; "" = AWS
    s3_profile: str = ""  # a profile of ~/.aws/config; "" = the default credential chain
    s3_anon: bool = False  # public buckets without credentials
    retries: int = 5  # kept for configs that set it; the time budget below is what bounds retrying
    backoff_s: float = 0.5  # first wait; doubles per attempt, capped at 30 s
    give_up_after_s: float = 600.0  # transient failures of one URL are retried this long, then the run stops
    extra: dict = field(default_factory=dict)  # further fsspec options per scheme {"gs": {...}}

    def _fsspec_kwargs(self, url: str, one_attempt: bool) -> dict[str, Any]:
        protocol = split_protocol(url)[0] or "file"
        kwargs: dict[str, Any] = copy.deepcopy(self.extra.get(protocol, {}))  # nested dicts are set below
        if protocol in ("s3", "s3a"):
            if self.s3_endpoint:
                kwargs.setdefault("client_kwargs", {})["endpoint_url"] = self.s3_endpoint
            if self.s3_profile:
                kwargs["profile"] = self.s3_profile
            if self.s3_anon:
                kwargs["anon"] = True
            if one_attempt:  # one retry layer (RetryBudget): botocore makes one attempt per call, not its own 5
                kwargs.setdefault("config_kwargs", {}).setdefault("retries", {"total_max_attempts": 1,
                                                                              "mode": "standard"})
        return kwargs

    def wait(self, attempt: int) -> float:
        return min(30.0, self.backoff_s * 2**attempt)

    def fs(self, url: str, *, own_retries: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec file system of ``url`` (cached by fsspec) and the path in it.

        One attempt per call: the caller's :class:`RetryBudget` is the one retry layer. Callers that no
        budget covers (the shard writers and the indexer's manifest write) pass ``own_retries=True`` and
        keep the back-end's own retries, so one throttled request does not fail a long write.
        """
        fs, path = url_to_fs(url, **self._fsspec_kwargs(url, one_attempt=not own_retries))
        if not own_retries and getattr(fs, "retries", None) not in (None, 1) and "s3" in fs.protocol:
            fs.retries = 1  # s3fs's own retry loop (5 tries): the budget here is the one layer
        return fs, path

    def open(self, url: str, mode: str = "rb", *, own_retries: bool = False) -> IO:
        """Open ``url`` (one attempt unless ``own_retries``, as :meth:`fs`)."""
        fs, path = self.fs(url, own_retries=own_retries)
        return fs.open(path, mode)
