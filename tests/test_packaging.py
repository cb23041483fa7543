"""Packaging files agree with each other (no build): torch and Ray pins, one faiss build per install line.

pyproject.toml declares the faiss builds as mutually exclusive extras (``cpu``: faiss-cpu, ``gpu``:
faiss-gpu-cu12; both install the same ``faiss`` module). The Makefile builds the CPU test environments,
the Dockerfiles the GPU images; these tests keep their pins and extras consistent.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from msnoop.evaluate.knn import FAISS_CPU_DISTS, FAISS_GPU_PREFIX

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile", "Dockerfile.cellpose")


def logical_lines(text: str) -> list[str]:
    """Lines with shell/Dockerfile continuations (``\\`` at the end) joined and comments dropped."""
    out: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((buf + line).strip())
        buf = ""
    if buf:
        out.append(buf.strip())
    return [x for x in out if x]


def install_commands(text: str) -> list[str]:
    """Each ``pip install`` command of a Dockerfile or Makefile (a ``RUN a && b`` line gives a and b)."""
    cmds = []
    for line in logical_lines(text):
        for part in re.split(r"&&|;", line):
            if re.search(r"\bpip\s+install\b", part):
                cmds.append(part.strip())
    return cmds


def local_extras(cmd: str) -> set[str]:
    """Extras of the local project in an install command: ``-e '.[cpu,dev]'`` or ``".[gpu]"`` -> {...}."""
    found = re.findall(r"""(?:^|\s)['"]?\.\[([^\]]*)\]""", cmd)
    return {e.strip() for group in found for e in group.split(",") if e.strip()}


def torch_pins(cmd: str) -> list[str]:
    """Every torch requirement in an install command, e.g. ``['torch==2.13.0']`` (bare ``torch`` included)."""
    return re.findall(r"(?<![\w.-])torch(?:[=<>!~]=?[\w.+*]+)?(?![\w-])", cmd)


def base_image(text: str) -> str:
    m = re.search(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert m, "no FROM line"
    return m.group(1)


def _read(name: str) -> str:
    return (REPO / name).read_text()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads(_read("pyproject.toml"))


@pytest.fixture(scope="module")
def tested_torch() -> str:
    pins = [ln.strip() for ln in _read("constraints/cpu.txt").splitlines() if ln.strip().startswith("torch")]
    assert len(pins) == 1 and pins[0].startswith("torch=="), f"constraints/cpu.txt: expected one torch==X, found {pins}"
    return pins[0].split("==", 1)[1]


def _name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_faiss_extras_are_the_builds_faiss_build_knows(pyproject) -> None:
    extras = pyproject["project"]["optional-dependencies"]
    assert [_name(r) for r in extras["cpu"]] == ["faiss-cpu"] and "faiss-cpu" in FAISS_CPU_DISTS
    assert [_name(r) for r in extras["gpu"]] == ["faiss-gpu-cu12"] and "faiss-gpu-cu12".startswith(FAISS_GPU_PREFIX)
    # no other extra and no core dependency pulls in a faiss build
    for name, reqs in {**extras, "dependencies": pyproject["project"]["dependencies"]}.items():
        if name not in ("cpu", "gpu"):
            assert not [r for r in reqs if _name(r).startswith("faiss")], f"{name} pulls in faiss: {reqs}"


@pytest.mark.parametrize("name", ["Makefile", *DOCKERFILES])
def test_no_install_line_takes_both_faiss_builds(name) -> None:
    cmds = install_commands(_read(name))
    assert any(local_extras(c) for c in cmds), f"{name}: no install of the local project found"
    for cmd in cmds:
        assert not {"cpu", "gpu"} <= local_extras(cmd), f"{name}: installs both faiss builds: {cmd}"


def test_makefile_cpu_venvs_use_the_cpu_extra(tested_torch) -> None:
    cmds = install_commands(_read("Makefile"))
    project = [c for c in cmds if local_extras(c)]
    assert len(project) >= 2  # .venv and .venv-cellpose
    for cmd in project:
        assert "cpu" in local_extras(cmd) and "gpu" not in local_extras(cmd), cmd
    for cmd in cmds:
        assert "-c constraints/cpu.txt" in cmd, f"Makefile: an install without the CPU torch constraint: {cmd}"
        assert all(p == f"torch=={tested_torch}" for p in torch_pins(cmd)), cmd


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_pin_the_tested_torch_and_use_the_gpu_extra(name, tested_torch) -> None:
    text = _read(name)
    cmds = install_commands(text)
    pins = [p for c in cmds for p in torch_pins(c)]
    assert pins and all(p == f"torch=={tested_torch}" for p in pins), f"{name}: torch {pins}, tested {tested_torch}"
    assert "--index-url" not in text and "--extra-index-url" not in text, f"{name}: torch from another index"
    project = [local_extras(c) for c in cmds if local_extras(c)]
    assert project and all("gpu" in e and "cpu" not in e for e in project), f"{name}: extras {project}"
    # the build ends by checking the faiss install (no GPU visible while building: count_gpus=False)
    assert "faiss_build(count_gpus=False)" in text and "! pip show faiss-cpu" in text


def test_cellpose_image_matches_the_cellpose_venv() -> None:
    make = [c for c in install_commands(_read("Makefile")) if "$(CP_VENV)" in c and local_extras(c)]
    assert len(make) == 1, make
    want = {"gpu" if e == "cpu" else e for e in local_extras(make[0])}
    docker = [local_extras(c) for c in install_commands(_read("Dockerfile.cellpose")) if local_extras(c)]
    assert docker == [want], f"Dockerfile.cellpose installs {docker}, the Makefile's cellpose venv {want} (cpu->gpu)"
    assert "cellpose" in want


@pytest.mark.parametrize("name", DOCKERFILES)
def test_ray_base_image_is_the_pinned_ray(name, pyproject) -> None:
    pins = [r for r in pyproject["project"]["dependencies"] if _name(r) == "ray"]
    assert len(pins) == 1 and "==" in pins[0], pins
    ray_version = pins[0].split("==", 1)[1].strip()
    image = base_image(_read(name))
    repo, _, tag = image.partition(":")
    assert repo == "rayproject/ray", image
    assert tag.split("-")[0] == ray_version, f"{name}: base image {image}, pyproject ray=={ray_version}"
    assert "py311" in tag.split("-"), f"{name}: base image {image} is not Python 3.11"


def test_the_checks_catch_bad_files() -> None:
    # the parsers find what the checks above must refuse
    bad = (
        'FROM rayproject/ray:2.9.0-py311-cu121\nRUN pip install torch --index-url x \\\n && pip install ".[cpu,gpu]"\n'
    )
    cmds = install_commands(bad)
    assert local_extras(cmds[1]) == {"cpu", "gpu"}
    assert torch_pins(cmds[0]) == ["torch"]
    assert torch_pins("pip install -c constraints/cpu.txt torch==2.12.0 torchvision==0.28") == ["torch==2.12.0"]
    assert local_extras("pip install -q -e '.[cpu,dev,cellpose]'") == {"cpu", "dev", "cellpose"}
    assert base_image(bad).split(":")[1].split("-")[0] == "2.9.0"
    assert install_commands("# pip install '.[gpu]'\nRUN echo hi\n") == []
