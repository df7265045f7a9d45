"""SLURM node-list expansion and DeepSpeed hostfiles (checked against real `scontrol` in test_slurm.py)."""
import pytest

from cluster.hostlist import HostlistError, expand_hostlist, hostfile_text, main

# Forms SLURM accepts (`scontrol show hostnames` expands each the same way; see test_slurm.py).
NODELISTS = [
    ("gpu[001-004,010],cpu7", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "cpu7"]),
    ("node7", ["node7"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding when the lower bound has none
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-gpu[01-02]", ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02"]),
    ("a[1,3],b[2-3],c", ["a1", "a3", "b2", "b3", "c"]),
    ("dgx-h100-[1-2]", ["dgx-h100-1", "dgx-h100-2"]),
]


@pytest.mark.parametrize("nodelist, hosts", NODELISTS)
def test_expand(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad, why", [("gpu[001-004", "unbalanced"), ("gpu]1[", "unbalanced"),
                                      ("gpu[4-1]", "backwards"), ("gpu[a-b]", "bad range"), ("", "no hosts"),
                                      ("gpu[1-2[3]]", "unbalanced")])
def test_bad_node_lists_name_the_list(bad, why):
    with pytest.raises(HostlistError, match=why) as e:
        expand_hostlist(bad)
    assert repr(bad) in str(e.value)


def test_hostfile_and_cli(tmp_path, capsys, monkeypatch):
    assert hostfile_text(["gpu001", "gpu002"], 8) == "gpu001 slots=8\ngpu002 slots=8\n"
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[001-002]")
    assert main(["--hostfile", str(tmp_path / "hosts"), "--slots", "4"]) == 0
    assert (tmp_path / "hosts").read_text() == "gpu001 slots=4\ngpu002 slots=4\n"
    assert main(["cpu[1-2]"]) == 0 and capsys.readouterr().out == "cpu1\ncpu2\n"
    assert main(["cpu[1-"]) == 2
    assert capsys.readouterr().err.strip() == "error: node list 'cpu[1-': unbalanced brackets"
