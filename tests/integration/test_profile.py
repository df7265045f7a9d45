"""train.profile: a torch.profiler trace of the listed steps in <run.dir>/profile, as Chrome trace JSON
(what Perfetto reads as it is, and TensorBoard with its PyTorch profiler plugin, the optional extra `profile`);
the other steps are not traced, and the profiler's own stderr lines stay out of the log."""
import json
import subprocess
import sys

import pytest

from pretrain.config import ConfigError, load_config
from tests.conftest import ROOT, run_main, tiny_args


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, demo_root):
    run_dir = tmp_path_factory.mktemp("profiled") / "run"
    r = run_main(tiny_args(run_dir, demo_root, 4, 4, "eval.mode=none", "train.profile=[3]"), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, r


def test_listed_steps_leave_a_chrome_trace_in_the_run_dir(profiled):
    run_dir, r = profiled
    traces = sorted((run_dir / "profile").glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0_step3"], traces  # step 3 only
    trace = json.loads(traces[0].read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)  # the step's operators, forward and backward
    assert "profile of step 3 written to" in r.stderr and "pip install 'mixer-pretrain[profile]'" in r.stderr
    assert "USDT" not in r.stderr + r.stdout and "profiler_start" not in r.stderr  # kineto's lines are silenced


def test_the_trace_opens_in_tensorboards_profiler_plugin(profiled):
    run_dir, _ = profiled
    # The plugin's own loader, in a process of its own (it spawns workers).
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITH_TB_PLUGIN, str(run_dir / "profile")],
                            capture_output=True, text=True, timeout=300)
    if "No module named 'torch_tb_profiler'" in loaded.stderr:
        pytest.skip("the optional extra profile (torch-tb-profiler) is not installed: "
                    "pip install -c constraints.txt '.[profile]'")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["rank0_step3", "Overview", "Operator", "Trace", "Memory"], loaded.stdout


LOAD_WITH_TB_PLUGIN = """
import sys
from torch_tb_profiler import io
from torch_tb_profiler.profiler.loader import RunLoader
if __name__ == "__main__":
    run = RunLoader("profile", sys.argv[1], io.Cache()).load()
    (worker, _), profile = next(iter(run.profiles.items()))
    print(worker, *[view.display_name for view in profile.views])
"""


def test_a_bad_profile_step_is_one_line():
    with pytest.raises(ConfigError, match=r"^command line: 'train.profile' must be a list of steps, each > 0"):
        load_config(str(ROOT / "configs/demo.yaml"), ["train.profile=[0]"])
