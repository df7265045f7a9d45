"""Eval records and watcher claims on local storage."""
import json
import os
import socket
import time

from pretrain.evaluation import EvalRecords
from pretrain.evaluation.summary import records_table


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    a, b = EvalRecords(str(tmp_path)), EvalRecords(str(tmp_path))
    assert a.claim(10, stale_after_s=3600) and not b.claim(10, stale_after_s=3600)
    a.release(10)
    assert b.claim(10, stale_after_s=3600)
    # Too old: taken over even though its owner (this process) is alive.
    claim = tmp_path / "eval/claims/step_0000010.claim"
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time() - 100}))
    assert not a.claim(10, stale_after_s=3600) and a.claim(10, stale_after_s=50)


def test_a_claim_still_being_written_is_not_taken_over(tmp_path):
    """The owner creates its claim file, then writes it: a rival reading in between finds it empty.
    Taking that over made two watchers evaluate the same step; only an old unreadable claim is stale."""
    a, b = EvalRecords(str(tmp_path)), EvalRecords(str(tmp_path))
    claim = tmp_path / "eval/claims/step_0000000.claim"
    claim.parent.mkdir(parents=True)
    claim.write_bytes(b"")  # created, not yet written
    assert not b.claim(0, stale_after_s=3600)
    old = time.time() - 120  # the owner died between creating and writing it
    os.utime(claim, (old, old))
    assert a.claim(0, stale_after_s=3600)


def test_records_round_trip_and_table(tmp_path):
    rec = EvalRecords(str(tmp_path))
    for step, acc in ((200, 0.8), (0, 0.5)):
        rec.write({"step": step, "checkpoint": "x", "results": {"fewshot": {"5shot": acc}}, "errors": {}})
    rec.write({"step": 400, "checkpoint": "y", "results": {}, "errors": {"fewshot": "ValueError: boom"}})
    assert rec.steps() == [0, 200, 400] and rec.has(200) and not rec.has(300)
    assert rec.read(200)["results"]["fewshot"]["5shot"] == 0.8
    lines = records_table(list(rec.all())).splitlines()
    assert lines[0].split() == ["step", "fewshot/5shot", "errors"]
    assert lines[1].split() == ["0", "(init)", "0.5000"] and lines[3].split() == ["400", "ERR", "fewshot"]
    assert not list(tmp_path.glob("eval/*.tmp-*"))
