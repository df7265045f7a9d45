"""README.md and docs/*.md checked without running anything (the runs: tests/integration/test_docs.py).
Vocabulary of the blocks: docs/testing.md, "Doc tests"."""
import re
import tokenize
from pathlib import Path

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


# ---------------------------------------------------------------- the docs speak of the product

_HEX = r"(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}"  # a commit id: hex with a digit and a letter
HISTORY = [
    ("an issue number", re.compile(r"\b(?:issues?|PR|pull request)\s*#?\d+", re.I)),
    ("an issue number", re.compile(r"(?<![\w&/])#\d{1,5}\b")),
    ("a commit id", re.compile(rf"`{_HEX}`|\b(?:at|commit)\s+{_HEX}\b")),
    ("branch talk", re.compile(r"\bthis branch\b", re.I)),
    ("history", re.compile(r"\b(?:since|before|after|until) issue\b", re.I)),
]
# ../x, not a markdown link target (static_problems checks those)
_UP = re.compile(r"(?<![.\w(])(?:\.\./)+[\w.-]+(?:/[\w-][\w.-]*)*")


def history_words(path: str, text: str) -> list[str]:
    """``path:line: what: 'match'`` for each history word of ``text`` and each ``../`` path that is not in
    the repository, resolved from the file's folder."""
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        hits += [f"{path}:{n}: {what}: {m.group(0)!r}" for what, pattern in HISTORY for m in pattern.finditer(line)]
        for m in _UP.finditer(line):
            target = ((ROOT / path).parent / m.group(0)).resolve()
            if not target.is_relative_to(ROOT) or not target.exists():
                hits.append(f"{path}:{n}: a path outside the repository: {m.group(0)!r}")
    return hits


# Python 3.12+ splits f-strings into FSTRING_START / _MIDDLE / _END tokens: the middle holds the text.
_PROSE_TOKENS = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def _prose_of_code(path: Path) -> str:
    """The comments and string literals of a Python file (docstrings, messages), on their own lines."""
    lines = path.read_text().splitlines()
    out = [""] * len(lines)
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in _PROSE_TOKENS:
                for k, text in enumerate(tok.string.splitlines()):
                    out[tok.start[0] - 1 + k] += " " + text
    return "\n".join(out)


def product_texts() -> list[tuple[str, str]]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").glob("*.yaml"))]
    code = sorted(p for d in ("pretrain", "data_pipeline", "cluster") for p in (ROOT / d).rglob("*")
                  if p.is_file() and p.suffix in (".py", ".sh", ".sbatch", ".c", ".md", ".yaml"))
    return [(str(p.relative_to(ROOT)), p.read_text()) for p in files] + \
        [(str(p.relative_to(ROOT)), _prose_of_code(p) if p.suffix == ".py" else p.read_text()) for p in code]


def test_docs_configs_and_comments_speak_of_the_product_not_its_history():
    texts = product_texts()
    assert len(texts) > 100 and any(p.startswith("cluster/slurm/") for p, _ in texts)
    hits = [hit for path, text in texts for hit in history_words(path, text)]
    assert hits == [], "\n".join(hits)


def test_history_words_are_found():
    text = ("Since issue 24 the format is 2.\nSee #12 and PR 7.\nMeasured at aa352b7, then `0c1d2e3f`.\n"
            "On this branch.\nBuild with `../shared/tools/gpu-wheels`.\nSee [x](../README.md), ../README.md, "
            "`.../step_N`, issue count 3, 1234567 bytes, `deadbeef`, C# 10, &#39;\n")
    hits = history_words("docs/x.md", text)
    assert [h.split(": ", 1)[1] for h in hits] == [
        "an issue number: 'issue 24'", "history: 'Since issue'", "an issue number: 'PR 7'",
        "an issue number: '#12'", "a commit id: 'at aa352b7'", "a commit id: '`0c1d2e3f`'",
        "branch talk: 'this branch'", "a path outside the repository: '../shared/tools/gpu-wheels'"], hits


def test_the_image_extensions_the_writer_accepts_are_listed():
    from data_pipeline.write import _IMAGE_SUFFIXES

    data = (ROOT / "docs/data.md").read_text()
    listed = re.search(r"A folder's images are the files\s+ending in ([^;.]*(?:\.[^;]*?)*?), in any case", data)
    assert listed, "docs/data.md does not list the image extensions the writer accepts"
    assert sorted(re.findall(r"`(\.\w+)`", listed.group(1))) == sorted(_IMAGE_SUFFIXES)


def test_the_h14_config_states_its_model_size_and_adam_memory():
    import torch

    from pretrain.models.factory import create_model

    text = (ROOT / "configs/h14.yaml").read_text()
    with torch.device("meta"):
        params = sum(p.numel() for p in create_model("mixer_h14_224", num_classes=21843).parameters())
    assert f"# {params / 1e6:.0f}M params: Adam's two fp32 moments alone are {params * 8 / 1e9:.1f} GB" in text
    assert f"{params * 16 / 1e9:.1f} GB with the fp32\n# weights and gradients" in text


def test_the_demo_takes_the_same_time_in_the_readme_and_its_config():
    figure = re.compile(r"about ([\d.]+) min\w* on 2 cores\S* \(?[\w ]*?:? ?(\d+-\d+ s), set-up included")
    readme, demo = (figure.search((ROOT / p).read_text()) for p in ("README.md", "configs/demo.yaml"))
    assert readme and demo and readme.groups() == demo.groups()


def test_a_doctest_shrink_may_not_change_precision_or_workers():
    page = "<!-- doctest: train.steps=2 train.precision=fp32 -->\n```bash\ntrue\n```\n"
    problems = static_problems("docs/x.md", page)
    assert problems == ["docs/x.md:2: doctest override 'train.precision=fp32' changes how the commands run, not "
                        "their size; the page's commands must run as written (see docs/testing.md, 'Doc tests')"]
    page = page.replace("train.precision=fp32", "data.num_workers=1")
    assert "'data.num_workers=1' changes how the commands run" in static_problems("docs/x.md", page)[0]
