"""train.profile: a torch.profiler trace of the listed steps in <run.dir>/profile, as Chrome trace JSON
(what TensorBoard's profiler plugin and Perfetto read); the other steps are not traced."""
import json

import pytest

from pretrain.config import ConfigError, load_config
from tests.conftest import ROOT, run_main, tiny_args


def test_listed_steps_leave_a_chrome_trace_in_the_run_dir(tmp_path, demo_root):
    run_dir = tmp_path / "run"
    r = run_main(tiny_args(run_dir, demo_root, 4, 4, "eval.mode=none", "train.profile=[3]"), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    traces = sorted((run_dir / "profile").glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0_step3"], traces  # step 3 only
    trace = json.loads(traces[0].read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)  # the step's operators, forward and backward
    assert "profile of step 3 written to" in r.stderr


def test_a_bad_profile_step_is_one_line():
    with pytest.raises(ConfigError, match=r"^command line: 'train.profile' must be a list of steps, each > 0"):
        load_config(str(ROOT / "configs/demo.yaml"), ["train.profile=[0]"])
