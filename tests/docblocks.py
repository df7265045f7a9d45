"""The command blocks of README.md and docs/*.md, as tests (vocabulary: docs/testing.md, "Doc tests").

`pages()` parses every page into `Block`s; `static_problems(page)` lists what is wrong without running
anything (missing files and modules, config lines that would not load, dead links); `run_page(...)`
runs a page's runnable blocks in order in a sandbox directory and raises `BlockFailed` naming the
page, the line and the command of the first one that fails.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/*.md"]
TAGS = {"gpu", "cluster", "remote", "long"}  # needs something this machine lacks: checked, not run
RUN_LANGS = {"bash", "python"}
DEFAULT_TIMEOUT_S = 300.0
# What a page's sandbox links to: the repository as a newcomer's checkout has it.
SANDBOX_LINKS = ["pretrain", "data_pipeline", "cluster", "configs", "bench", "tests", "docs", "Makefile",
                 "pyproject.toml", "constraints.txt", "README.md"]
_REPO_PATH = re.compile(r"^(?:configs|pretrain|data_pipeline|cluster|bench|tests)/[\w./{},-]+\.(?:py|yaml|sbatch|txt)$")
_FENCE = re.compile(r"^```(\S*)\s*(.*)$")
_OPTIONS = re.compile(r"^<!--\s*doctest:(.*)-->\s*$")
_DOTTED = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)+=")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Keys a shrink may not set: they change how the command runs, not how long (the page must run as written).
NOT_A_SHRINK = ("train.precision", "data.num_workers")


class BlockFailed(AssertionError):
    pass


@dataclass
class Command:
    line: int  # 1-based line of the page where the command starts
    text: str  # continuation lines joined, trailing comment removed


@dataclass
class Block:
    page: str  # relative to ROOT
    line: int  # line of the opening fence
    lang: str
    tags: set[str]
    text: str
    overrides: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)
    timeout_s: float = DEFAULT_TIMEOUT_S
    covered_by: str = ""
    option_error: str = ""

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGS and not self.tags and not self.covered_by

    def where(self, line: int | None = None) -> str:
        return f"{self.page}:{line or self.line}"

    def commands(self) -> list[Command]:
        if self.lang != "bash":
            return []
        out, pending, start = [], "", 0
        for i, raw in enumerate(self.text.splitlines()):
            line = raw.rstrip()
            if not pending:
                start = self.line + 1 + i
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            text = strip_comment(pending + line).strip()
            pending = ""
            if text:
                out.append(Command(start, text))
        return out


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a '#' after whitespace, outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _parse_options(block: Block, words: str) -> None:
    try:
        tokens = shlex.split(words)
    except ValueError as e:
        block.option_error = f"cannot parse doctest options: {e}"
        return
    for tok in tokens:
        if _DOTTED.match(tok) and tok.split("=", 1)[0] in NOT_A_SHRINK:
            block.option_error = (f"doctest override {tok!r} changes how the commands run, not their size; the "
                                  "page's commands must run as written (see docs/testing.md, 'Doc tests')")
        elif _DOTTED.match(tok):
            block.overrides.append(tok)
        elif tok.startswith("expect="):
            block.expect.append(tok[len("expect="):])
        elif tok.startswith("timeout="):
            block.timeout_s = float(tok[len("timeout="):])
        elif tok.startswith("covered-by="):
            block.covered_by = tok[len("covered-by="):]
        else:
            block.option_error = f"unknown doctest word {tok!r} (see docs/testing.md, 'Doc tests')"


def parse(page: str, text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, rest = m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        block = Block(page, i + 1, lang, set(rest.split()), "\n".join(lines[i + 1:j]))
        opt = _OPTIONS.match(lines[i - 1]) if i else None
        if opt:
            _parse_options(block, opt.group(1))
        blocks.append(block)
        i = j + 1
    return blocks


def page_names() -> list[str]:
    names: list[str] = []
    for pattern in PAGES:
        names += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))
    return names


def pages() -> dict[str, list[Block]]:
    return {name: parse(name, (ROOT / name).read_text()) for name in page_names()}


# ---------------------------------------------------------------- static checks

def _expand(path: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(path))


def module_exists(name: str) -> bool:
    """Whether `python -m name` finds a module, without importing it (DeepSpeed takes seconds)."""
    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])
    if spec is None:
        return False
    dirs = list(spec.submodule_search_locations or [])
    for k, part in enumerate(parts[1:]):
        last = k == len(parts) - 2
        hits = [d for d in dirs if (Path(d) / part / "__init__.py").exists() or
                (last and (Path(d) / f"{part}.py").exists())]
        if not hits:
            return False
        dirs = [str(Path(d) / part) for d in hits]
    return True


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def main_args(tokens: list[str]) -> list[str] | None:
    """The pretrain/main.py arguments of a command line, or None if it does not run main.py."""
    for i, tok in enumerate(tokens):
        if tok.endswith("pretrain/main.py"):
            return tokens[i + 1:]
        if tok == "cluster.launch" and "--" in tokens[i:]:
            return tokens[tokens.index("--", i) + 1:]
        if tok.endswith("cluster/slurm/pretrain.sbatch") and i + 1 < len(tokens):
            return ["--config", *tokens[i + 1:]]
    return None


def check_main_args(args: list[str]) -> str:
    """'' if pretrain/main.py would load this config with these overrides (as --print-config does)."""
    from pretrain.config import ConfigError, load_config
    from pretrain.main import parse_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parse_args(args)
    except SystemExit:
        return f"pretrain/main.py rejects the arguments: {err.getvalue().strip().splitlines()[-1]}"
    config = ns.config if os.path.isabs(ns.config) else str(ROOT / ns.config)
    try:
        load_config(config, ns.overrides)
    except ConfigError as e:
        return str(e).splitlines()[0]
    return ""


def check_launch_args(tokens: list[str]) -> str:
    """'' if cluster.launch accepts its own options (its --dry-run, in this process)."""
    from cluster.launch import main as launch_main

    i = tokens.index("cluster.launch")
    ours = tokens[i + 1:tokens.index("--", i)] if "--" in tokens[i:] else tokens[i + 1:]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = launch_main([*ours, "--dry-run", "--", "--config", "configs/demo.yaml"])
    except SystemExit as e:
        rc = e.code
    return "" if rc in (0, None) else f"cluster.launch rejects {' '.join(ours)}: {err.getvalue().strip()}"


def _makefile_targets() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M)}


def command_problems(block: Block, cmd: Command) -> list[str]:
    where = f"{block.where(cmd.line)}: {cmd.text}"
    try:
        tokens = shlex.split(cmd.text)
    except ValueError as e:
        return [f"{where}: cannot split into words: {e}"]
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # LAUNCHER=deepspeed sbatch ...
        tokens.pop(0)
    problems = []
    for tok in tokens:
        value = tok.split("=", 1)[1] if tok.startswith("--") and "=" in tok else tok
        if _REPO_PATH.match(value):
            problems += [f"{where}: {p} does not exist" for p in _expand(value) if not (ROOT / p).exists()]
    for i, tok in enumerate(tokens[:-1]):
        if tok == "-m" and not module_exists(tokens[i + 1]):
            problems.append(f"{where}: no module {tokens[i + 1]}")
    if tokens[:1] == ["make"]:
        problems += [f"{where}: the Makefile has no target {t}" for t in tokens[1:]
                     if not t.startswith("-") and t not in _makefile_targets()]
    args = main_args(tokens)
    if args is not None:
        bad = check_main_args(args + block.overrides)
        if bad:
            problems.append(f"{where}: {bad}")
    if "cluster.launch" in tokens:
        bad = check_launch_args(tokens)
        if bad:
            problems.append(f"{where}: {bad}")
    return problems


def yaml_problems(block: Block) -> list[str]:
    """A yaml block is a config fragment: loaded over configs/base.yaml like a config file."""
    from pretrain.config import ConfigError, load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fragment.yaml"
        path.write_text(f"include: {ROOT / 'configs/base.yaml'}\n{block.text}\n")
        try:
            load_config(str(path), ["data.train=x.json"] if "train" not in block.text else [])
        except ConfigError as e:
            message = str(e).splitlines()[0].replace(str(path), "the block")
            return [f"{block.where()}: yaml block does not load as a config: {message}"]
    return []


def covered_problems(block: Block) -> list[str]:
    test = ROOT / block.covered_by
    if not test.is_file():
        return [f"{block.where()}: covered-by={block.covered_by} does not exist"]
    text = test.read_text()
    missing = [tok for cmd in block.commands() for tok in shlex.split(cmd.text)
               if (tok.startswith("--") or _REPO_PATH.match(tok)) and tok not in text]
    return [f"{block.where()}: {block.covered_by} does not run {', '.join(missing)}"] if missing else []


def prose_problems(page: str, text: str) -> list[str]:
    """configs, modules and links named anywhere on the page (outside output blocks)."""
    problems, fenced, skip = [], False, False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            skip = fenced and line[3:].split()[:1] in ([], ["text"])  # output shown to the reader
            continue
        if fenced and skip:
            continue
        for m in re.finditer(r"configs/[\w{},.-]+\.yaml", line):
            problems += [f"{page}:{n}: {p} does not exist" for p in _expand(m.group(0)) if not (ROOT / p).exists()]
        for m in re.finditer(r"python3? -m ([\w.]+)", line):
            if not module_exists(m.group(1)):
                problems.append(f"{page}:{n}: no module {m.group(1)}")
        for m in _LINK.finditer(line):
            problems += [f"{page}:{n}: {p}" for p in link_problems(page, m.group(1))]
    return problems


def link_problems(page: str, target: str) -> list[str]:
    if re.match(r"^[a-z]+:", target):  # https:, mailto:
        return []
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    if not file.exists():
        return [f"link {target}: {path} does not exist"]
    if anchor and file.suffix == ".md" and anchor not in anchors(file):
        return [f"link {target}: no heading '{anchor}' in {file.relative_to(ROOT)}"]
    return []


def static_problems(page: str, text: str | None = None) -> list[str]:
    """Everything wrong with a page (its text read from ROOT unless given) that shows without running it."""
    text = (ROOT / page).read_text() if text is None else text
    problems = prose_problems(page, text)
    for block in parse(page, text):
        if block.option_error:
            problems.append(f"{block.where()}: {block.option_error}")
        unknown = block.tags - TAGS
        if unknown and block.lang in RUN_LANGS:
            problems.append(f"{block.where()}: unknown fence tag(s) {sorted(unknown)}; known: {sorted(TAGS)}")
        for cmd in block.commands():
            problems += command_problems(block, cmd)
        if block.lang == "python":
            try:
                compile(block.text, block.where(), "exec")
            except SyntaxError as e:
                problems.append(f"{block.where()}: python block: {e}")
        if block.lang == "yaml":
            problems += yaml_problems(block)
        if block.covered_by:
            problems += covered_problems(block)
    return problems


# ---------------------------------------------------------------- running

def make_sandbox(root: Path, demo_root: str, images: Path) -> dict[str, str]:
    """A directory that looks like a checkout after `make`, and the environment to run in it."""
    root.mkdir(parents=True, exist_ok=True)
    for name in SANDBOX_LINKS:
        (root / name).symlink_to(ROOT / name)
    (root / "data").mkdir()
    (root / "data/demo").symlink_to(demo_root)
    (root / "my_images").symlink_to(images)
    bin_dir = root / ".doctest-bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):  # a wrapper, not a link: a venv's python finds its venv by its path
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / name).chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def write_images(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fish"), per_split: dict | None = None) -> Path:
    """An ImageNet-style folder, root/{train,val}/<class>/*.jpg, of small random pictures."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (per_split or {"train": 8, "val": 4}).items():
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (72 + 8 * i, 96, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{c}_{i}.jpg", quality=90)
    return root


def shrunk(block: Block, cmd: Command) -> str:
    """The command with the block's shrink overrides appended, if it runs pretrain/main.py."""
    if not block.overrides or main_args(shlex.split(cmd.text)) is None:
        return cmd.text
    return cmd.text + " " + " ".join(shlex.quote(o) for o in block.overrides)


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.splitlines()[-n:])


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run one block's commands in order in `cwd`; returns (wall, CPU) seconds. Raises BlockFailed with
    page:line and the command."""
    start, cpu, output = time.monotonic(), _children_cpu_s(), ""
    if block.lang == "python":
        steps = [(block.line, [sys.executable, "-c", block.text], "python block")]
    else:
        steps = [(c.line, ["bash", "-o", "pipefail", "-c", shrunk(block, c)], shrunk(block, c))
                 for c in block.commands()]
    for line, argv, shown in steps:
        left = block.timeout_s - (time.monotonic() - start)
        try:
            r = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=max(left, 1.0))
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            raise BlockFailed(f"{block.where(line)}: {shown}\n  did not finish within the block's "
                              f"{block.timeout_s:.0f} s (doctest timeout=S)\n{_tail(out)}") from None
        output += r.stdout + r.stderr
        if r.returncode != 0:
            raise BlockFailed(f"{block.where(line)}: {shown}\n  exited {r.returncode}\n{_tail(r.stdout + r.stderr)}")
    for text in block.expect:
        if text not in output:
            raise BlockFailed(f"{block.where()}: the block's output lacks {text!r} (doctest expect=)\n{_tail(output)}")
    return time.monotonic() - start, _children_cpu_s() - cpu


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_page(page: str, blocks: list[Block], cwd: Path, env: dict[str, str]) -> dict[int, tuple[float, float]]:
    """Run a page's runnable blocks in order; returns (wall, CPU) seconds per block (by fence line)."""
    return {b.line: run_block(b, cwd, env) for b in blocks if b.runs}
