"""Every command block of README.md and docs/*.md that runs on a CPU is run, in order, one sandbox per
page, with the shrink its `<!-- doctest: ... -->` comment documents (vocabulary: docs/testing.md,
"Doc tests"; the checks that run nothing: tests/unit/test_docs.py)."""
import time

import pytest

from tests.docblocks import Block, BlockFailed, make_sandbox, pages, parse, run_block, run_page, write_images

# The README's launcher block runs the documented commands as written: cluster.launch and the deepspeed
# launcher on their default port 29500, which a test running beside it (pytest -n 2) may hold.
pytestmark = [pytest.mark.slow, pytest.mark.serial]
RUNNABLE = {page: blocks for page, blocks in pages().items() if any(b.runs for b in blocks)}


@pytest.fixture(scope="session")
def my_images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("my_images"))


@pytest.fixture
def sandbox(tmp_path, demo_root, my_images):
    return tmp_path / "checkout", make_sandbox(tmp_path / "checkout", demo_root, my_images)


@pytest.mark.parametrize("page", sorted(RUNNABLE))
def test_page_runs(page, sandbox):
    cwd, env = sandbox
    start = time.monotonic()
    seconds = run_page(page, RUNNABLE[page], cwd, env)
    per_block = ", ".join(f"line {line}: {wall:.0f} s ({cpu:.0f} s CPU)" for line, (wall, cpu) in seconds.items())
    print(f"\n{page}: {time.monotonic() - start:.1f} s; {per_block}")


def test_a_failing_block_names_page_line_and_command(sandbox):
    cwd, env = sandbox
    page = "# x\n\n```bash\ntrue   # fine\npython pretrain/main.py --config configs/nope.yaml\n```\n"
    [block] = parse("docs/x.md", page)
    with pytest.raises(BlockFailed) as e:
        run_block(block, cwd, env)
    message = str(e.value)
    assert message.startswith("docs/x.md:5: python pretrain/main.py --config configs/nope.yaml\n  exited 2"), message
    assert "configs/nope.yaml: config file not found" in message


def test_shrink_is_appended_and_expect_checked(sandbox):
    cwd, env = sandbox
    text = ('<!-- doctest: train.steps=3 expect="steps: 3" -->\n```bash\n'
            'python pretrain/main.py --config configs/demo.yaml --print-config   # the resolved config\n```\n')
    [block] = parse("docs/x.md", text)
    run_block(block, cwd, env)
    block.expect = ["steps: 4"]
    with pytest.raises(BlockFailed, match=r"docs/x.md:2: the block's output lacks 'steps: 4'"):
        run_block(block, cwd, env)


def test_a_block_over_its_time_is_stopped(sandbox):
    cwd, env = sandbox
    block = Block("docs/x.md", 7, "bash", set(), "sleep 30", timeout_s=1)
    with pytest.raises(BlockFailed, match=r"docs/x.md:8: sleep 30\n  did not finish within the block's 1 s"):
        run_block(block, cwd, env)
