"""The README runs: every fenced ``bash`` and ``python`` block, in order and as written, on a tiny copy of the data.

The README is read as a newcomer reads it: from the repository root, with the data in ``../shared/data``. The test
builds that world in a temporary folder: ``work/`` is the repository root (``configs/``, ``Makefile``,
``pyproject.toml``, ``constraints/``, ``jobs/`` and ``.venv`` are links to this checkout's), and ``shared/data``
holds a few images of each data set the README uses (links to the real files): 20 yeast cells, 15 HPA cells and
the BBBC021 profile tables as they are. The blocks run one after another in ``work/``, so a later
block reads what an earlier one wrote, as in a reader's session; ``bash`` blocks run in bash (``set -e``: a failing
command fails its block, and the message names it), ``python`` blocks in the environment's Python.

A block is skipped only when the line before its fence is ``<!-- readme-test: skip: REASON -->`` (installing
packages, a GPU, a long run, an object store); :func:`test_every_skip_says_why` keeps those few and explained, and
:func:`test_skipped_blocks_name_real_commands_and_valid_configs` still checks their verbs and configs. Every block that runs must exit 0 and keep stderr free of log lines below WARNING and of Ray's start-up
noise: the README promises quiet commands. The ``make demo`` block must print nothing at all on stderr.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = Path(os.environ.get("MSNOOP_SHARED_DATA", ROOT.parent / "shared" / "data"))
#: What the README may name in the repository root (linked into the test's working folder).
REPO_ENTRIES = ("configs", "jobs", "docs", "Makefile", "pyproject.toml", "constraints", "Dockerfile")
#: The comment before a fence that keeps its block from running; the reason is required.
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip:\s*(?P<reason>\S.*?)\s*-->$")
#: Lines that must not reach stderr: log lines below WARNING, Ray's C++ start-up notices and core-worker lines.
NOISE = re.compile(r"\b(INFO|DEBUG)\b|logging\.cc:|core_worker|\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] \d+ \d+\]")


@dataclass(frozen=True)
class Block:
    """One fenced block of the README."""

    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    section: str
    skip: str | None

    @property
    def commands(self) -> int:
        """Commands (statements) in the block: lines that are neither comments nor continuations."""
        lines = [ln for ln in self.code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        return sum(1 for i, ln in enumerate(lines) if i == 0 or not lines[i - 1].rstrip().endswith("\\"))

    @property
    def id(self) -> str:
        first = next((ln for ln in self.code.splitlines() if ln.strip() and not ln.startswith("#")), "")
        return f"L{self.line}-{first.split('#')[0].strip()[:40]}"


def readme_blocks(text: str) -> list[Block]:
    """Every ``bash`` and ``python`` fenced block of ``text`` with its skip marker (None when it runs)."""
    blocks, lines, section = [], text.splitlines(), ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        fence = re.match(r"^```(\w+)\s*$", line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = SKIP.match(before)
            if fence.group(1) in ("bash", "python"):
                code = "\n".join(lines[i + 1 : end]) + "\n"
                blocks.append(Block(fence.group(1), code, i + 1, section, marker.group("reason") if marker else None))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src, target_is_directory=src.is_dir())


def tiny_shared_data(dest: Path) -> None:
    """A few images of each data set the README uses, as links to the real files, in the real layout."""
    yeast = pd.read_csv(SHARED / "yeast" / "yeast_labels.csv")
    named = yeast["gfp_path"].str.endswith("/AAC1_1_rfp_10_gfp.tif")  # the cell the README queries by id
    yeast = pd.concat([yeast[named], yeast[~named].groupby(["protein", "field"]).head(1)]).drop_duplicates()
    (dest / "yeast").mkdir(parents=True)
    yeast.to_csv(dest / "yeast" / "yeast_labels.csv", index=False)
    _link(SHARED / "yeast" / "images", dest / "yeast" / "images")

    hpa = pd.read_csv(SHARED / "hpa_toy" / "hpa_labels.csv").groupby("gene").head(5)
    (dest / "hpa_toy").mkdir(parents=True)
    hpa.to_csv(dest / "hpa_toy" / "hpa_labels.csv", index=False)
    for folder in {p.split("/")[0] for p in hpa["green_path"]}:
        _link(SHARED / "hpa_toy" / folder, dest / "hpa_toy" / folder)

    _link(SHARED / "bbbc021_profiles", dest / "bbbc021_profiles")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """``(work folder, environment)``: the repository root as the README sees it, beside a tiny ``shared/data``."""
    for name in ("yeast", "hpa_toy", "bbbc021_profiles"):
        if not (SHARED / name).exists():
            pytest.skip(f"{SHARED / name} is absent (real data lives in ../shared/data)")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "msnoop").is_file():
        pytest.skip(f"the msnoop command is not installed in {venv} (make install)")
    base = tmp_path_factory.mktemp("readme")
    work = base / "work"
    work.mkdir()
    for name in REPO_ENTRIES:
        if (ROOT / name).exists():
            _link(ROOT / name, work / name)
    _link(venv, work / ".venv")
    tiny_shared_data(base / "shared" / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MSNOOP_")) and k != "PYTHONPATH"}
    env.update(
        {
            "PATH": f"{work / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "MSNOOP_HOME": str(base / "msnoop_home"),  # a local cluster of the README's, recorded apart
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    yield work, env
    # a block that failed between `msnoop cluster start` and `stop` leaves no cluster behind
    subprocess.run(
        [str(venv / "bin" / "msnoop"), "cluster", "stop"], env=env, cwd=work, capture_output=True, timeout=120
    )


def _run(block: Block, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if block.lang == "python":
        script = work / f".readme_block_{block.line}.py"
        script.write_text(block.code)
        cmd = [str(work / ".venv" / "bin" / "python"), script.name]
    else:
        trap = "trap 'echo \"README command failed (exit $?): $BASH_COMMAND\" >&2' ERR\n"
        cmd = ["bash", "-e", "-o", "pipefail", "-c", trap + block.code]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900, check=False)


def test_make_demo_is_up_to_date() -> None:
    """`make demo` in the README must not reinstall: the environment is newer than what it was built from."""
    if shutil.which("make") is None or not (ROOT / ".venv" / ".installed").is_file():
        pytest.skip("no make, or no .venv built by make here")
    res = subprocess.run(["make", "-q", ".venv/.installed"], cwd=ROOT, capture_output=True, check=False)
    assert res.returncode == 0, "pyproject.toml or constraints/ changed since .venv was built: run `make install`"


def test_every_skip_says_why() -> None:
    skipped = [b for b in BLOCKS if b.skip is not None]
    assert all(len(b.skip.split()) >= 3 for b in skipped), [(b.line, b.skip) for b in skipped]
    running = [b for b in BLOCKS if b.skip is None]
    n_skipped, n_running = sum(b.commands for b in skipped), sum(b.commands for b in running)
    assert n_running >= 2 * n_skipped, f"two thirds of the README must run: {n_running} run, {n_skipped} skipped"
    sections = {b.section for b in running}
    assert {"Quick start", "Python API", "Search and inspect", "On a cluster"} <= sections, sections


def test_skipped_blocks_name_real_commands_and_valid_configs() -> None:
    """What the test cannot run is still checked for drift: each msnoop verb exists and each config validates."""
    from msnoop.cli import app
    from msnoop.job_kinds import load_config

    verbs = {c.name for c in app.registered_commands}
    for block in (b for b in BLOCKS if b.skip is not None):
        for verb in re.findall(r"(?:^|\s|/)msnoop\s+([a-z]+)", block.code, flags=re.M):
            assert verb in verbs, f"README line {block.line}: `msnoop {verb}` is not a command"
        for config in re.findall(r"\bconfigs/[\w/.-]+\.yaml\b", block.code):
            assert (ROOT / config).is_file(), f"README line {block.line}: {config} does not exist"
            load_config(ROOT / config)  # ConfigError names the key


def test_a_skip_marker_needs_a_reason() -> None:
    text = "Intro\n\n<!-- readme-test: skip: installs packages from the network -->\n```bash\npip install x\n```\n"
    text += "<!-- readme-test: skip: -->\n```bash\nmsnoop demo\n```\n```python\nprint(1)\n```\n```yaml\na: 1\n```\n"
    blocks = readme_blocks(text)
    assert [(b.lang, b.skip) for b in blocks] == [
        ("bash", "installs packages from the network"),
        ("bash", None),  # an empty reason is no marker: the block runs
        ("python", None),
    ]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.data
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_written(block: Block, sandbox) -> None:
    if block.skip is not None:
        pytest.skip(f"README line {block.line}: {block.skip}")
    work, env = sandbox
    res = _run(block, work, env)
    where = f"README line {block.line} ({block.section})"
    assert res.returncode == 0, (
        f"{where} failed:\n{block.code}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}"
    )
    noisy = [ln for ln in res.stderr.splitlines() if NOISE.search(ln)]
    assert not noisy, f"{where} is not quiet on stderr:\n" + "\n".join(noisy[:20])
    if "make demo" in block.code:
        assert res.stderr == "", f"{where}: `make demo` printed on stderr:\n{res.stderr[-3000:]}"
