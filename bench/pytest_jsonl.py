"""A pytest plugin for bench/gpu_suite.py: one JSON line per finished test, appended as it finishes, to
the file named by $PYTEST_JSONL, so a run stopped by its timeout still says which tests passed.

    PYTEST_JSONL=results.jsonl python -m pytest -p bench.pytest_jsonl tests/gpu
"""
from __future__ import annotations

import json
import os

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # One line per test: its call phase, or the setup/teardown phase that failed or skipped it.
    if report.when != "call" and report.passed:
        return
    path = os.environ.get("PYTEST_JSONL")
    if not path:
        return
    message = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        message = report.longrepr[2]  # (file, line, reason)
    elif report.failed:
        message = report.longreprtext[-2000:]
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "phase": report.when, "outcome": report.outcome,
                            "seconds": round(report.duration, 3), "message": message}) + "\n")
