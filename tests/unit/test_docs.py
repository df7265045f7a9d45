"""README.md and docs/*.md checked without running anything (the runs: tests/integration/test_docs.py).
Vocabulary of the blocks: docs/testing.md, "Doc tests"."""
import pytest

from tests.docblocks import ROOT, page_names, parse, static_problems

TOPICS = ["data", "configuration", "engines", "checkpoints", "evaluation", "cluster", "faults", "testing", "gpu"]


@pytest.mark.parametrize("page", page_names())
def test_page_names_only_what_exists_and_loads(page):
    assert static_problems(page) == []


def test_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024, "README.md is over 12 KB: move the detail to docs/"
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name not in ("manifest.md", "decode.md"):  # reached from data.md
            assert f"(docs/{page.name})" in readme, f"README's Documentation table lacks docs/{page.name}"
    assert [t for t in TOPICS if not (ROOT / "docs" / f"{t}.md").is_file()] == []


def test_readme_says_how_deepspeed_runs_on_a_cpu():
    launching = (ROOT / "README.md").read_text().split("## Launching")[1].split("\n## ")[0]
    for fact in ("--num_gpus", "1 on CPU", "deepspeed_shm_comm", "g++"):
        assert fact in launching
    blocks = parse("README.md", (ROOT / "README.md").read_text())
    ran = [b for b in blocks if b.runs and "deepspeed --num_gpus 2" in b.text]
    assert ran and any("engine deepspeed" in e for e in ran[0].expect), "the DeepSpeed CPU launch must be run"


BROKEN = """# A page

See [the data page](data.md#no-such-heading) and [nothing](missing.md).

<!-- doctest: train.steps=2 frobnicate -->
```bash
python pretrain/main.py --config configs/nope.yaml
python pretrain/main.py --config configs/demo.yaml optim.weigth_decay=0.1
python -m data_pipeline.no_such_module --help
make no-such-target
sbatch cluster/slurm/pretrain.sbatch configs/demo.yaml optim.lr=-1
```

```bash gpux
true
```

```yaml
optim:
  lr: -1
```
"""


def test_a_broken_page_is_reported_line_by_line():
    problems = "\n".join(static_problems("docs/broken.md", BROKEN))
    for expected in ["docs/broken.md:3: link data.md#no-such-heading: no heading 'no-such-heading'",
                     "docs/broken.md:3: link missing.md: missing.md does not exist",
                     "docs/broken.md:6: unknown doctest word 'frobnicate'",
                     "docs/broken.md:7: python pretrain/main.py --config configs/nope.yaml: configs/nope.yaml does not",
                     "docs/broken.md:8: python pretrain/main.py --config configs/demo.yaml optim.weigth_decay=0.1: "
                     "command line: unknown key 'optim.weigth_decay'",
                     "docs/broken.md:9: python -m data_pipeline.no_such_module --help: no module data_pipeline.no_such",
                     "docs/broken.md:10: make no-such-target: the Makefile has no target no-such-target",
                     "docs/broken.md:11: sbatch cluster/slurm/pretrain.sbatch configs/demo.yaml optim.lr=-1: "
                     "command line: 'optim.lr' must be > 0",
                     "docs/broken.md:14: unknown fence tag(s) ['gpux']",
                     "docs/broken.md:18: yaml block does not load as a config"]:
        assert expected in problems, problems
